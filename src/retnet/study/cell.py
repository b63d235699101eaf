"""One cell of a study: build the model from the cell's seed, train it with `retnet train`'s
step on the batches of (seed, step), checkpoint it through `retnet.checkpoint` (so a killed
cell resumes at its last checkpoint, exactly), and return its record: validation loss, and
training tokens/s and peak memory measured in this process on these batches."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retnet.checkpoint import (
    read_latest,
    read_manifest,
    read_verified,
    remove_orphans,
    resolve_checkpoint,
    save_checkpoint,
)
from retnet.data import PackedWindows
from retnet.memory import PeakMemory
from retnet.study import archs
from retnet.study.grid import Budget, Cell, Recall
from retnet.study.mqar import RecallLoss, accuracy
from retnet.train.step import Diverged, Schedule, adamw, micro_batches, train_step, validation_loss

PROBE_STEPS = 3  # timed steps after which a cell too slow for its budget is stopped


@dataclass
class Data:
    """What every cell of a study reads: the tokenizer and the same windows."""

    tokenizer: Any
    train: PackedWindows
    val: list[torch.Tensor]
    long_val: list[torch.Tensor]  # [1, LENGTH_FACTOR·seq_len + 1] windows: loss by position


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimiser: enough to finish the record."""

    step: int = 0
    train_seconds: float = 0.0
    step_seconds: list | None = None  # every step's time: its median resists a busy machine
    peak_mib: float = 0.0
    batches_sha256: str = ""  # a chain over every batch read so far
    curve: list | None = None
    resumed_at: list | None = None


def steps_of(cell: Cell, budget: Budget, target: int) -> int:
    """The budget's one rule: tokens_per_param × the size's RetNet non-embedding parameters."""
    per_step = budget.batch_size * budget.seq_len
    return max(budget.min_steps, math.ceil(budget.tokens_per_param * target / per_step))


def _chain(previous: str, batch: torch.Tensor) -> str:
    return hashlib.sha256(previous.encode() + batch.numpy().tobytes()).hexdigest()


def _resume(folder: Path, cell: Cell, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> Progress:
    """The cell's last checkpoint loaded into model and optimiser (each file checked against
    its manifest); a fresh Progress when there is none."""
    remove_orphans(folder)
    if read_latest(folder) is None:
        return Progress(curve=[], resumed_at=[], step_seconds=[])
    from safetensors.torch import load

    path = resolve_checkpoint(folder)
    manifest = read_manifest(path)
    meta = json.loads(read_verified(path, manifest, "meta.json"))
    if meta.get("study_cell") != cell.id:
        raise ValueError(f"{path} holds cell {meta.get('study_cell')!r}, not {cell.id}; "
                         f"remove {folder} to run the cell again")
    model.load_state_dict(load(read_verified(path, manifest, "model.safetensors")))
    state = torch.load(io.BytesIO(read_verified(path, manifest, "train_state.pt")),
                       weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    progress.step_seconds = progress.step_seconds or []  # a checkpoint from before the field
    progress.resumed_at.append(progress.step)
    return progress


def _save(folder: Path, cell: Cell, model: torch.nn.Module, optimizer, data: Data,
          progress: Progress, vocab: int) -> None:
    # cloned: a tied embedding and head share storage, which safetensors will not write
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = archs.base_config(cell, vocab)  # the size this cell matches
    state = {"optimizer": optimizer.state_dict(), "step": progress.step,
             "rng": torch.get_rng_state(), "progress": vars(progress)}
    save_checkpoint(folder, progress.step, weights, config, data.tokenizer, state,
                    {"study_cell": cell.id, "arch": cell.arch})


def _evaluate(model, data: Data, progress: Progress, loss: float, tokens: int) -> None:
    val = validation_loss(model, data.val, loss_of=model.loss)
    progress.curve.append({"step": progress.step, "tokens": tokens, "train_loss": loss,
                           "val_loss": val})


def run_cell(cell: Cell, budget: Budget, data: Data, folder: Path, device: torch.device,
             recall: Recall | None = None) -> dict[str, Any]:
    """Train and evaluate one cell (resuming from `folder`); its record, whatever the outcome.
    `recall`: the recall task's settings, for a cell of task "mqar" (`budget` is then
    recall.budget(...))."""
    # an MQAR cell's tokens are its task's, not a tokenizer's
    vocab = recall.vocab_size if recall is not None else data.tokenizer.vocab_size
    target = archs.target_parameters(cell, vocab)
    steps = steps_of(cell, budget, target)
    torch.manual_seed(cell.seed)
    model = archs.builder(cell, vocab)().to(device)
    if recall is not None:
        model = RecallLoss(model, recall.keys)
    optimizer = adamw(model, cell.lr)
    progress = _resume(folder, cell, model, optimizer)
    record = {"non_embedding": model.non_embedding(), "target_non_embedding": target,
              "steps": steps, "model": archs.describe(model)}
    try:
        status = _train(cell, budget, data, folder, model, optimizer, progress, steps, vocab)
    except Diverged as err:
        status = {"status": "diverged", "reason": f"{err} at step {progress.step + 1}"}
    if status["status"] == "done":
        status.update(_measure(model, data) if recall is None else
                      {"recall_accuracy": accuracy(model, recall, cell.seed),
                       "recall": dataclasses.asdict(recall)})
    # finished cells are never resumed: their checkpoints only took space
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    (folder / "latest").unlink(missing_ok=True)
    tokens = progress.step * budget.batch_size * budget.seq_len
    return {**record, **status, "tokens": tokens,
            "flops_6nd": 6 * record["non_embedding"] * tokens,
            "tokens_per_s": tokens / progress.train_seconds if progress.train_seconds else None,
            **_step_rates(progress.step_seconds, budget.batch_size * budget.seq_len),
            "train_seconds": progress.train_seconds, "peak_mib": progress.peak_mib,
            "batches_sha256": progress.batches_sha256, "curve": progress.curve,
            "resumed_at": progress.resumed_at,
            "val_loss": progress.curve[-1]["val_loss"] if progress.curve else None}


def _step_rates(seconds: list | None, tokens_per_step: int) -> dict[str, float]:
    """Tokens/s at the median step and at the fastest decile's edge: the mean over the whole
    run counts every moment another process held the cores; these do not, as long as half
    (a tenth) of the steps ran on a quiet machine."""
    if not seconds:
        return {}
    p10, p50 = (float(x) for x in np.quantile(seconds, [0.1, 0.5]))
    return {"tokens_per_s_median_step": tokens_per_step / p50,
            "tokens_per_s_fast_steps": tokens_per_step / p10}


def _measure(model: torch.nn.Module, data: Data) -> dict[str, Any]:
    """The finished model's loss by position to LENGTH_FACTOR× the training length, and its
    accuracy on the shipped tasks at 0 and k shots. A measurement that cannot run (lm-eval
    not installed, a validation split shorter than one long window) is recorded with its
    reason; the trained cell stays done."""
    from retnet.study.evaluate import LENGTH_FACTOR, few_shot, loss_by_position

    out: dict[str, Any] = {}
    for key, measure in (("loss_by_position",
                          lambda: loss_by_position(model, data.long_val, LENGTH_FACTOR)),
                         ("few_shot", lambda: few_shot(model, data.tokenizer))):
        try:
            out[key] = measure()
        except Exception as err:  # recorded, not fatal: the training result stands
            out.setdefault("measure_errors", {})[key] = f"{type(err).__name__}: {err}"[:300]
    return out


def _train(cell: Cell, budget: Budget, data: Data, folder: Path, model, optimizer,
           progress: Progress, steps: int, vocab: int) -> dict[str, Any]:
    """The loop from progress.step to `steps`; {"status": ...} (and a reason)."""
    schedule = Schedule(cell.lr, steps, round(budget.warmup_frac * steps))
    device = next(model.parameters()).device
    meter, start, loss = PeakMemory(device), progress.step, math.nan
    model.train()
    for step in range(start, steps):
        batches = micro_batches(data.train, cell.seed, step, budget.batch_size)
        progress.batches_sha256 = _chain(progress.batches_sha256, batches[0])
        began = time.perf_counter()
        loss = train_step(model, optimizer, batches, schedule.lr_at(step), loss_of=model.loss)
        if device.type == "cuda":  # time the work, not the kernel launches
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - began
        progress.train_seconds += elapsed
        progress.step_seconds.append(elapsed)
        progress.step = step + 1
        progress.peak_mib = max(progress.peak_mib, meter.mib())
        if progress.step == start + PROBE_STEPS and progress.step < steps:
            minutes = progress.train_seconds / progress.step * steps / 60
            if minutes > budget.max_cell_minutes:
                return {"status": "too-slow", "reason": f"{steps} steps would take about "
                        f"{minutes:.0f} minutes of training here (budget.max_cell_minutes "
                        f"{budget.max_cell_minutes:g}), measured over {progress.step} steps"}
        tokens = progress.step * budget.batch_size * budget.seq_len
        if progress.step % budget.checkpoint_every == 0 or progress.step == steps:
            _evaluate(model, data, progress, loss, tokens)
        if progress.step % budget.checkpoint_every == 0 and progress.step < steps:
            _save(folder, cell, model, optimizer, data, progress, vocab)
    return {"status": "done"}
