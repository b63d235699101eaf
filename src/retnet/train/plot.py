"""Loss curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from retnet.files import atomic_write


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training loss (per step) and validation loss (per evaluation) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        # format given: the temporary name's suffix is not .png
        return atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
