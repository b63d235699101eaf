"""Compiled fast paths beside the plain PyTorch reference, behind one switch.

    retnet.kernels.set_enabled(False)   # or RETNET_KERNELS=0 in the environment

The PyTorch forms in `retnet.ops` stay the reference; a fast path is used only where it is
available (built here, the right device and dtype) and enabled, and otherwise the reference
runs, after a one-line notice on stderr saying why (once per reason).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

ENV = "RETNET_KERNELS"  # "0", "off" or "false" turns every fast path off
_override: bool | None = None
_noticed: set[str] = set()
_cpu: bool | None = None  # None: not tried yet


def enabled() -> bool:
    """Whether fast paths may be used: `set_enabled`, else the environment (default on)."""
    if _override is not None:
        return _override
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def set_enabled(flag: bool | None) -> None:
    """Turn the fast paths on or off for this process; None goes back to $RETNET_KERNELS."""
    global _override
    _override = flag


def notice(reason: str) -> None:
    """Say once on stderr that the reference runs instead of a fast path, and why."""
    if reason not in _noticed:
        _noticed.add(reason)
        print(f"retnet: {reason}; using the PyTorch reference", file=sys.stderr)


def cpu_kernels() -> bool:
    """Whether torch.ops.retnet's CPU kernels are loaded here (building them on first use)."""
    global _cpu
    if not enabled():
        return False
    if _cpu is None:
        from retnet.kernels.build import BuildError, load

        try:
            load()
            _cpu = True
        except BuildError as err:
            notice(f"CPU kernels unavailable ({err})")
            _cpu = False
    return _cpu


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """x [M, K] float32 @ (weight [N, K] · scale[:, None])ᵀ → [M, N] float32, streaming the
    weight once: weight float32, bfloat16, or int8 with per-row scales [N] float32. The
    compiled kernel where available, else the same product in PyTorch."""
    scale = torch.empty(0) if scale is None else scale
    if x.device.type == "cpu" and cpu_kernels():
        return torch.ops.retnet.linear(x.contiguous(), weight.contiguous(), scale)
    y = x @ weight.to(x.dtype).t()
    return y * scale if scale.numel() else y
