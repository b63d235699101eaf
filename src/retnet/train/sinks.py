"""Where a run's metrics go beside metrics.jsonl (which stays the record the plot and the tests
read): TensorBoard event files in RUN/tensorboard/ when the `tensorboard` package is installed,
and Weights & Biases when `wandb` is installed and WANDB_PROJECT names a project (it sends data
to a service, so only when asked)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any


class MetricSinks:
    """The optional metric writers of one run (rank 0's): `log` each record, `close` at the end."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        self.tensorboard = self.wandb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        if importlib.util.find_spec("wandb") is not None and os.environ.get("WANDB_PROJECT"):
            import wandb

            self.wandb = wandb.init(project=os.environ["WANDB_PROJECT"], dir=str(out),
                                    config=config, name=out.name)

    def log(self, record: dict[str, Any]) -> None:
        """The record's numbers (loss, lr, tokens_per_s, val_*, eval/TASK/METRIC) at its step."""
        step = record["step"]
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
