"""The study's plots from the report's summaries: validation loss against non-embedding
parameters and against training FLOPs (log-log, error bars: the range over seeds, dashed: the
power-law fit), training throughput against parameters, one line per architecture (and RetNet
variant); the ablations' differences with error bars, MQAR accuracy against the number of
pairs, and loss by position beyond the training length."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()


def _figure(path: Path, series: dict[str, list[tuple]], x: str, y: str, labels: tuple[str, str],
            title: str, error: bool, fits: dict | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs = [s[x] for _, s in points]
        ys = [s[y] for _, s in points]
        spread = ([[s[y] - s["min"] for _, s in points], [s["max"] - s[y] for _, s in points]]
                  if error else None)
        line = ax.errorbar(xs, ys, yerr=spread, fmt="o", ms=4, capsize=3, label=name)
        if fits and name in fits:
            ends = [min(xs), max(xs)]
            ax.plot(ends, [fits[name].at(e) for e in ends], "--", color=line[0].get_color(),
                    label=f"{name}: L ∝ x^{fits[name].b:.3f}")
        elif len(xs) > 1:
            ax.plot(xs, ys, "-", color=line[0].get_color(), alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel=labels[0], ylabel=labels[1], title=title)
    _save(fig, ax, path)
    plt.close(fig)


def plot_all(families: dict[str, list[tuple]], out: Path, fits: dict, flop_fits: dict
             ) -> list[str]:
    """loss_vs_params.png, loss_vs_flops.png and throughput.png in `out`; their names."""
    loss = "validation loss (nats/token)"
    _figure(out / "loss_vs_params.png", families, "non_embedding", "val_loss",
            ("non-embedding parameters", loss),
            "validation loss at the budget's tokens (bars: min–max over seeds)", True, fits)
    _figure(out / "loss_vs_flops.png", families, "flops", "val_loss",
            ("training FLOPs (6·N·tokens)", loss), "validation loss against training compute",
            True, flop_fits)
    _figure(out / "throughput.png", families, "non_embedding", "tokens_per_s",
            ("non-embedding parameters", "training tokens/s"),
            "training throughput, same batches, same process", False)
    return ["loss_vs_params", "loss_vs_flops", "throughput"]


def plot_ablations(rows: dict[str, dict], out: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    ax.bar(names, [rows[n]["diff"] for n in names], yerr=[rows[n]["se"] for n in names],
           capsize=4, color="tab:gray")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="validation loss − base (± se)", title="RetNet ablations (paper Table 6)")
    _save(fig, ax, out / "ablations.png")
    plt.close(fig)
    return "ablations"


def plot_recall(mean: dict[tuple, dict], out: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (arch, width), accs in sorted(mean.items()):
        ns = sorted(accs)
        ax.plot(ns, [accs[n] for n in ns], "o-", ms=4, label=f"{arch}, d={width}")
    ax.set(xscale="log", xlabel="key-value pairs in the row", ylabel="values recalled",
           ylim=(0, 1.02), title="multi-query associative recall (MQAR)")
    _save(fig, ax, out / "mqar.png")
    plt.close(fig)
    return "mqar"


def plot_positions(found: dict, out: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, curve in found["curves"].items():
        ax.plot(range(1, len(curve) + 1), curve, "o-", ms=4, label=arch)
    ax.axvline(1.5, color="gray", ls=":", lw=1)
    ax.set(xlabel="span of the window, in training lengths", ylabel="validation loss",
           title=f"loss by position beyond the training length (size {found['size']})")
    _save(fig, ax, out / "loss_by_position.png")
    plt.close(fig)
    return "loss_by_position"
