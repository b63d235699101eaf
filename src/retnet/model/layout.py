"""The memory order of a model's weight matrices: the default, or transposed for decoding.

`use_decode_layout(model)` stores every weight matrix as its transpose in memory ([in, out]
rows) while keeping its shape, values, name and the Parameter object itself: a [out, in] view
with strides (1, out); q, k, v and g share one buffer so a token's input projections are one
product. A one-token step then streams each matrix contiguously and splits the reduction
across cores (`retnet.ops.linear`); with the reused state buffers, a `small` float32 decode
step went from 21 to 12 ms in `retnet bench`. Every form, training, saving (checkpoints are
written contiguous) and loading work unchanged in either layout; results differ only by the
order of float additions. The embedding table is included: a token's row becomes a strided
read of D values, which costs nothing at decode time, and the tied LM head becomes a
contiguous stream.
"""

from __future__ import annotations

import torch
from torch import nn

from retnet.modules.retention import MultiScaleRetention

LAYOUTS = ("default", "decode")


@torch.no_grad()
def set_weight_layout(model: nn.Module, layout: str) -> nn.Module:
    """Re-store every 2-D parameter of `model` in `layout` ("default" or "decode"), in place.

    The Parameter objects stay the same (optimisers and tied weights keep pointing at them);
    only their storage is replaced. Returns the model.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "decode":
        for m in model.modules():
            if isinstance(m, MultiScaleRetention):
                _fuse_input_projections(m)
    for p in model.parameters():
        if p.dim() != 2:
            continue
        if layout == "decode" and p.stride()[0] != 1:
            p.data = p.data.t().contiguous().t()
        elif layout == "default" and not p.is_contiguous():
            p.data = p.data.contiguous()
    return model


def _fuse_input_projections(m: MultiScaleRetention) -> None:
    """Place Wqᵀ, Wkᵀ, Wvᵀ (and Wgᵀ) side by side in one [D, ΣOUT] buffer, so that a
    one-token step reads x's four projections in one pass (`MultiScaleRetention.fused_input`)."""
    projections = m.input_projections()
    if m.fused_input() is not None:
        return
    fused = torch.cat([p.weight.data.t() for p in projections], dim=1)  # [D, ΣOUT]
    start = 0
    for p in projections:
        width = p.weight.shape[0]
        p.weight.data = fused[:, start:start + width].t()
        start += width


def use_decode_layout(model: nn.Module) -> nn.Module:
    """Weights transposed in memory for the fastest one-token steps on a CPU; see the module."""
    return set_weight_layout(model, "decode")


def use_inference_layout(model: nn.Module) -> nn.Module:
    """The layout with the fastest one-token steps for this model's device and dtype: "decode"
    for float32 on a CPU (where `retnet.ops.linear` splits GEMVs across cores), else the
    default (bf16 GEMVs go through oneDNN, CUDA through cuBLAS, both fine as they are)."""
    p = next(model.parameters())
    fast = p.device.type == "cpu" and p.dtype == torch.float32
    return set_weight_layout(model, "decode" if fast else "default")


def weight_layout(model: nn.Module) -> str:
    """"decode" if every weight matrix is stored transposed, else "default"."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    if matrices and all(p.stride()[0] == 1 for p in matrices):
        return "decode"
    return "default"
