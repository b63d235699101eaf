"""The CPU kernel of a retention layer's output stage (`kernels/cpu/head_norm.h`) as an
autograd Function: silu(g) ⊙ GroupNorm(o / max(|z|, floor)) in one pass, forward and
backward, then (optionally) the output projection. It keeps o and g for the backward, not
autograd's four [B, T, H·V] tensors plus the projection's input: those are recomputed by one
more pass of the kernel. The PyTorch expression in `retnet.modules.retention` is the
reference (tests/ops/test_head_norm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retnet.ops.low_rank import LowRank, add_low_rank, low_rank_grads


class HeadNormGate(torch.autograd.Function):
    """(o_full [..., H, V+1], floor [..., H], g [..., H·V], weight, bias [H·V], eps,
    out_weight [D, H·V] or None, scale, *low) -> [..., D] (or [..., H·V] without out_weight);
    low: A [r, H·V] and B [D, r] of a LoRA update on the projection when scale is not None.
    All contiguous float32 on the CPU."""

    @staticmethod
    def forward(ctx, o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                eps: float, out_weight: Tensor | None, scale: float | None = None,
                *low: Tensor) -> Tensor:
        ctx.save_for_backward(o_full, floor, g, weight, bias, out_weight, *low)
        ctx.eps, ctx.scale = eps, scale
        y = torch.ops.retnet.head_norm_gate(o_full, floor, g, weight, bias, eps)
        if out_weight is None:
            return y
        out = F.linear(y, out_weight)
        return out if scale is None else add_low_rank(out, y, LowRank(*low, scale))

    @staticmethod
    def backward(ctx, grad: Tensor):
        o_full, floor, g, weight, bias, out_weight, *low = ctx.saved_tensors
        d_out_weight, d_low = None, ()
        if out_weight is not None:
            y = None
            if ctx.needs_input_grad[6] or low:  # the projection's input, recomputed
                y = torch.ops.retnet.head_norm_gate(o_full, floor, g, weight, bias, ctx.eps)
                y = y.view(-1, y.shape[-1])  # [N, H·V]
            flat = grad.reshape(-1, grad.shape[-1])  # [N, D]
            if ctx.needs_input_grad[6]:
                d_out_weight = flat.t().mm(y)
            d_y = flat.mm(out_weight)  # [N, H·V]
            if low:  # out += s·(y Aᵀ) Bᵀ: dA = (s g B)ᵀ y, dB = s gᵀ (y Aᵀ)
                g_low, grad_b = low_rank_grads(flat, y, LowRank(*low, ctx.scale))
                d_low = (g_low.t().mm(y), grad_b)
                d_y.addmm_(g_low, low[0])
            grad = d_y.view(*grad.shape[:-1], -1)
        d_o, d_g, d_w, d_b = torch.ops.retnet.head_norm_gate_backward(
            grad.contiguous(), o_full, floor, g, weight, bias, ctx.eps)
        return d_o, None, d_g, d_w, d_b, None, d_out_weight, None, *d_low


def head_norm_gate(o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                   eps: float, out_weight: Tensor | None = None, low: LowRank | None = None
                   ) -> Tensor:
    """o_full [B, T, H, V+1], floor [B, T, H] (or broadcastable), g [B, T, H·V] → [B, T, D]
    through out_weight [D, H·V] (and its LoRA update `low`), or [B, T, H·V] without it."""
    floor = floor.expand(o_full.shape[:-1]).contiguous()
    lora = () if low is None else (float(low.scale), low.a.contiguous(), low.b.contiguous())
    return HeadNormGate.apply(o_full.contiguous(), floor, g.contiguous(), weight.contiguous(),
                              bias.contiguous(), float(eps), out_weight, *lora)
