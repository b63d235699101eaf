"""The memory order of a model's weight matrices: the default, or transposed for decoding.
This module owns that layout: it writes it (`set_weight_layout`) and reads it back
(`fused_weight`, `weight_layout`); layers ask it. `retnet.ops.linear` only looks at a weight's
strides to pick its product.

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
from torch import Tensor, nn

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
            if hasattr(m, "input_projections"):  # a layer whose input products can be one
                _fuse(m.input_projections())
    for p in model.parameters():
        if p.dim() != 2:
            continue
        if layout == "decode" and p.stride()[0] != 1:
            p.data = p.data.t().contiguous().t()
        elif layout == "default" and not p.is_contiguous():
            p.data = p.data.contiguous()
    return model


def fused_weight(projections: list[nn.Linear]) -> Tensor | None:
    """[ΣOUT, D]: the weights of `projections` (all reading the same input) as one matrix, when
    the decode layout has placed them side by side in one buffer ([D, ΣOUT] in memory); else
    None. Checked on every call from the storage itself, so that anything that re-stores a
    weight (`.to()`, `load_state_dict`, the default layout) falls back to separate products
    instead of reading a stale buffer."""
    if any(hasattr(p, "lora_A") for p in projections):
        return None  # an unmerged LoRA adapter adds to its product (`retnet.modules.lora`)
    weights = [p.weight for p in projections]
    if not all(w.is_floating_point() for w in weights):
        return None  # int8 rows (`retnet.modules.quant`) multiply through their own scales
    first, total = weights[0], sum(w.shape[0] for w in weights)
    offset = 0
    for w in weights:
        if (w.stride() != (1, total) or w.untyped_storage().data_ptr()
                != first.untyped_storage().data_ptr()
                or w.storage_offset() != first.storage_offset() + offset):
            return None
        offset += w.shape[0]
    return first.as_strided((total, first.shape[1]), (1, total))


def _fuse(projections: list[nn.Linear]) -> None:
    """Place Wqᵀ, Wkᵀ, Wvᵀ (and Wgᵀ) side by side in one [D, ΣOUT] buffer, so that a
    one-token step reads x's four projections in one pass (`fused_weight`)."""
    if fused_weight(projections) is not None or not all(
            p.weight.is_floating_point() for p in projections):
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


def weight_layout(model: nn.Module) -> str:
    """"decode" if every weight matrix is stored transposed, else "default"."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    if matrices and all(p.stride()[0] == 1 for p in matrices):
        return "decode"
    return "default"
