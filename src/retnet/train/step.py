"""The one training step and schedule, shared by `retnet train` and `retnet compare`: AdamW
with weight decay on the matrices only, warm-up then decay, gradient accumulation over
micro-batches, clipping, the stop on a non-finite loss or gradient, and the validation loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from retnet.train import distributed as dist

# Defaults of both features (nanoGPT's values): decay 0.1 on the matrices, β₂ 0.95, the
# learning rate decaying to a tenth of its peak, gradients clipped to norm 1.
WEIGHT_DECAY, BETA2, MIN_LR_RATIO, MAX_GRAD_NORM = 0.1, 0.95, 0.1, 1.0

# (ids [B, T], targets [B, T]) -> the mean next-token loss: how each feature calls its model.
# Both features compute it through `retnet.ops.loss.linear_cross_entropy`, which never holds
# the [B·T, vocab] logits or their gradient (and so do both models of `retnet compare`).
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Windows(Protocol):
    """Where micro-batches come from (`retnet.data.PackedWindows`, or a test's fake)."""

    def batch(self, seed: int, step: int, rows: int, rank: int = 0, world: int = 1
              ) -> torch.Tensor: ...


@dataclass
class Data:
    """The training and validation data of a run and how the step reads it."""

    train: Windows  # PackedWindows, or `sft.ChatRows`
    val_batches: list[torch.Tensor]
    bits_per_token: float  # converts nats/token into bits per byte
    meta: dict[str, Any]
    loss: Callable[[torch.nn.Module], Loss]  # the wrapped model → its loss in the run's form


class Diverged(ValueError):
    """The loss or the gradient norm of a step is inf or NaN; nothing was updated."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the training {what} became {value}")
        self.what, self.value = what, value


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to `lr`, then cosine or linear decay to lr · min_lr_ratio at `steps`."""

    lr: float
    steps: int
    warmup: int = 0
    min_lr_ratio: float = MIN_LR_RATIO
    decay: Literal["cosine", "linear"] = "cosine"

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based)."""
        if step < self.warmup:
            # step 0 already learns: lr/warmup, not 0
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        shape = (0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine"
                 else 1 - progress)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only: not norms, embeddings or biases;
    frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (LoRA's base weights): no optimiser state
            continue
        is_matrix = p.dim() >= 2 and "embed" not in name and "lm_head" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY,
          beta2: float = BETA2) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)` with betas (0.9, beta2)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, beta2))


def micro_batches(windows: Windows, seed: int, step: int, batch_size: int, grad_accum: int = 1,
                  ctx: dist.Context | None = None) -> list[torch.Tensor]:
    """The `grad_accum` micro-batches [batch_size, T + 1] of optimiser step `step`: windows
    step·k … step·k + k − 1 of the (seed, index) stream, this rank's rows of each."""
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    return [windows.batch(seed, step * grad_accum + micro, batch_size, rank, world)
            for micro in range(grad_accum)]


def autocast(device: torch.device, amp: torch.dtype | None):
    """torch.autocast to `amp` on `device`; no autocast for None (float32)."""
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[torch.Tensor], lr: float, *, loss_of: Loss,
               clip: float = MAX_GRAD_NORM, amp: torch.dtype | None = None,
               ctx: dist.Context | None = None) -> float:
    """One optimiser step over `batches` (the micro-batches [B, T + 1] of one step).

    Sets the learning rate to `lr`, accumulates the gradient of the mean next-token loss
    over the micro-batches (DDP synchronises on the last only), clips the gradient to norm
    `clip` (0: no clipping; the norm is measured either way), and steps. `loss_of` calls the
    model: (ids [B, T], targets [B, T]) -> mean loss. ctx: the process group (None: one process, on
    the model's device).

    Returns the loss averaged over micro-batches and ranks. Raises `Diverged` before the
    optimiser step when the loss or the gradient norm is not finite."""
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(ctx.device)
        with dist.maybe_no_sync(model, sync=i == len(batches) - 1), autocast(ctx.device, amp):
            loss = loss_of(batch[:, :-1], batch[:, 1:]) / len(batches)
        loss.backward()
        total += loss.item()
    # The norm is measured whether or not it clips (max_norm inf scales by exactly 1).
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    mean_loss = ctx.mean(total)
    # A finite loss can still come with inf/NaN gradients, which would make every weight NaN:
    # stop before the optimiser step. Gradients are all-reduced, so every rank agrees.
    for what, value in (("loss", mean_loss), ("gradient norm", float(norm))):
        if not math.isfinite(value):
            raise Diverged(what, value)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, loss_of: Loss,
                    amp: torch.dtype | None = None, device: torch.device | None = None) -> float:
    """Mean next-token loss (nats per token) over fixed windows [B, T + 1], each batch
    weighted by its rows; the model is put back in training mode after."""
    device = device or next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, amp):
            total += loss_of(batch[:, :-1], batch[:, 1:]).item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count
