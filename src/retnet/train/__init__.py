"""`retnet train`: AdamW with warm-up and decay, accumulation, clipping, evaluation, exact
resume, DDP/FSDP2 under torchrun. `config` holds the options, `step` the one training step
(shared with `retnet compare`), `loop` the run, `distributed` the process group."""

from retnet.train.config import TrainConfig
from retnet.train.loop import command, train
from retnet.train.step import (
    Diverged,
    Schedule,
    adamw,
    micro_batches,
    param_groups,
    train_step,
    validation_loss,
)

__all__ = [
    "Diverged",
    "Schedule",
    "TrainConfig",
    "adamw",
    "command",
    "micro_batches",
    "param_groups",
    "train",
    "train_step",
    "validation_loss",
]
