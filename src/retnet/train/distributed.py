"""Process-group setup for torchrun (DDP with gloo on CPU / nccl on CUDA, or FSDP2), the
full (unsharded) model and optimiser state that checkpoints hold whatever the wrapping, and
rank 0's outcome for every rank. The one module of retnet that uses torch.distributed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
)

from retnet.device import pick_device

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a Python float over ranks (for logging)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.item() / self.world

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache); the others wait, then run it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def main_process() -> bool:
    """Whether this process is torchrun's rank 0, or runs alone: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str | None = None) -> Context:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if device is None and dev.type == "cuda":  # one GPU per process
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cpu":  # share the cores instead of oversubscribing them
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Context(rank, world, dev)


def rank0_outcome(ctx: Context, error: str | None) -> str | None:
    """Rank 0's error message (None: success) on every rank: one broadcast when world > 1."""
    if ctx.world == 1:
        return error
    box = [error]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(ctx: Context) -> None:
    if ctx.world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Context, kind: str) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on each block, then the root); unchanged in one process."""
    if ctx.world == 1:
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded model and optimiser state keyed by parameter names (same in every wrapping)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    return {"model": model_sd, "optimizer": optim_sd}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
