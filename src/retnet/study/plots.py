"""The study's plots from the report's summaries: validation loss against non-embedding
parameters (log-log, error bars: the range over seeds) and training throughput against
parameters, one line per architecture (and RetNet variant)."""

from __future__ import annotations

from pathlib import Path


def _figure(path: Path, series: dict[str, list[tuple]], y: str, ylabel: str, title: str,
            error: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs = [n for n, _ in points]
        ys = [s[y] for _, s in points]
        spread = ([[s[y] - s["min"] for _, s in points], [s["max"] - s[y] for _, s in points]]
                  if error else None)
        ax.errorbar(xs, ys, yerr=spread, fmt="o-", ms=4, capsize=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters", ylabel=ylabel,
           title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(families: dict[str, list[tuple]], out: Path) -> list[str]:
    """loss_vs_params.png and throughput.png in `out`; returns their names (no suffix)."""
    _figure(out / "loss_vs_params.png", families, "val_loss", "validation loss (nats/token)",
            "validation loss at the budget's tokens (bars: min–max over seeds)", error=True)
    _figure(out / "throughput.png", families, "tokens_per_s", "training tokens/s",
            "training throughput, same batches, same process", error=False)
    return ["loss_vs_params", "throughput"]
