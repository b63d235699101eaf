"""Compiled fast paths beside the plain PyTorch reference, behind one switch.

    retnet.kernels.set_enabled(False)   # or RETNET_KERNELS=0 in the environment

The PyTorch forms in `retnet.ops` stay the reference; a fast path is used only where it is
available (built here, the right device and dtype) and enabled, and otherwise the reference
runs, after a one-line notice on stderr saying why (once per reason). The fast paths:

- CPU decode (on by default): `torch.ops.retnet`, compiled from `kernels/cpu` (`cpu_kernels`).
- chunkwise retention (on by default, CPU and CUDA): `retnet.ops.chunkwise`, one autograd
  Function for training and prefill that recomputes its intermediates in the backward
  instead of keeping them (`_torch_chunkwise`; float64 runs the reference).
- a retention layer's output stage (on by default, CPU float32): division by the score sum,
  GroupNorm, gate and W_O in one pass forward and backward (`kernels/cpu/head_norm.h`).
- GPU retention (opt-in: `Form("chunkwise" | "recurrent", backend="triton")`): the Triton
  kernels of `kernels/triton_retention.py`, on CUDA tensors, or on CPU tensors under
  TRITON_INTERPRET=1 (`triton_path`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from retnet.ops.gate import FAST_HEAD_NORM_GATE
from retnet.ops.retention import FAST_FORMS
from retnet.ops.retention import _check_shapes as check_shapes

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


def triton_path(x: Tensor) -> bool:
    """Whether the Triton retention kernels may run on x (else a notice says why not)."""
    if not enabled():
        return False
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (x.is_cuda or (x.device.type == "cpu" and interpreted)):
        notice(f"the Triton kernels need CUDA tensors, not {x.device.type} "
               "(TRITON_INTERPRET=1 runs them on the CPU, slowly)")
        return False
    if x.dtype == torch.float64:
        notice("the Triton kernels compute in float32, not float64")
        return False
    if importlib.util.find_spec("triton") is None:
        notice("triton is not installed (pip install 'retnet-exact[triton]')")
        return False
    return True


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """x [M, K] float32 @ (weight [N, K] · scale[:, None])ᵀ → [M, N] float32, streaming the
    weight once: weight float32, bfloat16, or int8 with per-row scales [N] float32. The
    compiled kernel where available, else the same product in PyTorch."""
    scale = torch.empty(0) if scale is None else scale
    if x.device.type == "cpu" and cpu_kernels():
        return torch.ops.retnet.linear(x.contiguous(), weight.contiguous(), scale)
    y = x @ weight.to(x.dtype).t()
    return y * scale if scale.numel() else y


def _triton_form(form, q, k, v, log_decay, state, mask, out):
    """Form(backend="triton"): the fused kernels where they may run, else None (the PyTorch
    form runs)."""
    if not triton_path(q):
        return None
    if form.mode == "recurrent" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, log_decay, state)):
        notice("the Triton recurrent step has no backward (train with the chunkwise form)")
        return None
    from retnet.kernels import triton_retention as tr

    check_shapes(q, k, v, log_decay, state, mask)
    if form.mode == "chunkwise":
        return tr.chunkwise_retention(q, k, v, log_decay, state, mask, chunk_size=form.chunk_size)
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if state is None else state
    outputs = []
    for t in range(T):  # the recurrent form: one fused step kernel per token
        o, state = tr.retention_step(q[:, t], k[:, t], v[:, t], log_decay, state.float(),
                                     None if mask is None else mask[:, t],
                                     out=out if t == T - 1 else None)
        outputs.append(o)
    return torch.stack(outputs, dim=1), state


def _torch_chunkwise(form, q, k, v, log_decay, state, mask, out):
    """Form("chunkwise"): `retnet.ops.chunkwise` where enabled, else None (the reference)."""
    if form.mode != "chunkwise" or not enabled():
        return None
    if q.dtype == torch.float64:
        notice("the chunkwise fast path computes in float32, not float64")
        return None
    from retnet.ops.chunkwise import chunkwise_retention

    check_shapes(q, k, v, log_decay, state, mask)
    B, _, H, K = q.shape
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        log_decay = log_decay.to(device=q.device, dtype=torch.float32)
        state = (q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float())
        if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
            mask = None  # all real: shared decay factors (asked on the CPU only: no sync)
        if mask is not None:
            mask = mask.to(torch.float32)
            k = k * mask[:, :, None, None]  # a masked key writes nothing to the state
        return chunkwise_retention(q, k, v, log_decay, state, mask, form.chunk_size)


def _cpu_head_norm_gate(o_full, floor, g, weight, bias, eps, out_weight=None):
    """A layer's output stage through `kernels.head_norm` on CPU float32, else None."""
    tensors = (o_full, floor, g, weight, bias) + (() if out_weight is None else (out_weight,))
    if o_full.device.type != "cpu" or not cpu_kernels():
        return None
    if any(t.dtype != torch.float32 for t in tensors):
        notice("the fused output stage (GroupNorm and gate) takes float32 tensors")
        return None
    from retnet.kernels.head_norm import head_norm_gate

    return head_norm_gate(o_full, floor, g, weight, bias, eps, out_weight)


FAST_FORMS["triton"] = _triton_form
FAST_FORMS["torch"] = _torch_chunkwise
FAST_HEAD_NORM_GATE["cpu"] = _cpu_head_norm_gate
