"""The report of `retnet compare`: the per-model summary over seeds, a Markdown table, and
validation curves and loss by position as PNG. Reads results only (no models, no training)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per model: mean and spread (min–max over seeds) of the headline figures."""
    table: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        losses = [r["curve"][-1]["val_loss"] for r in rs]
        acc = [next(iter(r["zero_shot"].values())).get("acc,none", math.nan) for r in rs]
        table[name] = {"val_loss": statistics.mean(losses), "val_loss_min": min(losses),
                       "val_loss_max": max(losses), "val_ppl": math.exp(statistics.mean(losses)),
                       "acc": statistics.mean(acc), "tokens_per_s":
                       statistics.mean(r["tokens_per_s"] for r in rs),
                       "peak_mib": max(r["peak_mib"] for r in rs),
                       "non_embedding": rs[0]["non_embedding"]}
    return table


def _line_plot(path: Path, series: list[tuple[str, list[float], list[float]]], xlabel: str,
               ylabel: str, title: str, mark_x: float | None = None) -> None:
    """One PNG of labelled (label, xs, ys) lines; mark_x: a dashed "training length" line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys in series:
        ax.plot(xs, ys, "o-", ms=3, label=label)
    if mark_x is not None:
        ax.axvline(mark_x, color="grey", ls="--", lw=1)
        ax.text(mark_x, ax.get_ylim()[1], " training length", va="top", fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(results: dict, out: Path) -> None:
    """curves.png (validation loss against tokens) and positions.png (loss by position)."""
    runs = results["runs"]
    curves = [(f"{r['name']} (seed {r['seed']})", [p["tokens"] / 1e6 for p in r["curve"]],
               [p["val_loss"] for p in r["curve"]]) for r in runs]
    _line_plot(out / "curves.png", curves, "training tokens (millions)",
               "validation loss (nats/token)", "validation loss, same batches for every model")
    seq = results["config"]["seq_len"]
    positions = []
    for r in runs:
        losses = r["loss_by_position"]
        span = 4 * seq / len(losses)  # each bucket's centre
        positions.append((f"{r['name']} (seed {r['seed']})",
                          [span * (i + 0.5) for i in range(len(losses))], losses))
    _line_plot(out / "positions.png", positions, "token position", "validation loss",
               "loss by position up to 4× the training length", mark_x=seq)


def write_report(results: dict, out: Path) -> Path:
    """report.md (and the two plots) in `out` from the results of `run`."""
    cfg = results["config"]
    table = summarise(results["runs"])
    lines = ["# RetNet against a matched Transformer", "",
             f"{results['tokens_per_model']:,} training tokens per model, batch "
             f"{cfg['batch_size']} × {cfg['seq_len']}, {cfg['steps']} steps, lr {cfg['lr']}, "
             f"{cfg['seeds']} seed(s), BPE vocabulary {results['tokenizer_vocab']}.", "",
             "| model | non-embedding params | val loss (min–max) | val ppl | zero-shot acc | "
             "tokens/s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['non_embedding']:,} | {t['val_loss']:.4f} "
                     f"({t['val_loss_min']:.4f}–{t['val_loss_max']:.4f}) | {t['val_ppl']:.2f} | "
                     f"{t['acc']:.3f} | {t['tokens_per_s']:.0f} | {t['peak_mib']:.0f} |")
    buckets = len(results["runs"][0]["loss_by_position"])
    span = 4 * cfg["seq_len"] // buckets
    lines += ["", "Loss by position (validation windows of 4× the training length):", "",
              "| model | " + " | ".join(f"{i * span}–{(i + 1) * span}" for i in range(buckets))
              + " |", "|---|" + "---|" * buckets]
    for name in table:
        rows = [r["loss_by_position"] for r in results["runs"] if r["name"] == name]
        means = [sum(col) / len(col) for col in zip(*rows)]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    same = len({tuple(r["batch_hashes"]) for r in results["runs"] if r["seed"] == 0}) == 1
    lines += ["", f"Every model saw byte-identical batches: {same} (sha256 of each batch).",
              "", "![validation curves](curves.png)", "", "![loss by position](positions.png)"]
    _plots(results, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
