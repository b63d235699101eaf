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


class HeadNormGate(torch.autograd.Function):
    """(o_full [..., H, V+1], floor [..., H], g [..., H·V], weight, bias [H·V], eps,
    out_weight [D, H·V] or None) -> [..., D] (or [..., H·V] without out_weight); all
    contiguous float32 on the CPU."""

    @staticmethod
    def forward(ctx, o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                eps: float, out_weight: Tensor | None) -> Tensor:
        ctx.save_for_backward(o_full, floor, g, weight, bias, out_weight)
        ctx.eps = eps
        y = torch.ops.retnet.head_norm_gate(o_full, floor, g, weight, bias, eps)
        return y if out_weight is None else F.linear(y, out_weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        o_full, floor, g, weight, bias, out_weight = ctx.saved_tensors
        d_out_weight = None
        if out_weight is not None:
            if ctx.needs_input_grad[6]:
                y = torch.ops.retnet.head_norm_gate(o_full, floor, g, weight, bias, ctx.eps)
                d_out_weight = grad.reshape(-1, grad.shape[-1]).t().mm(y.view(-1, y.shape[-1]))
            grad = grad.matmul(out_weight)  # d y [..., H·V]
        d_o, d_g, d_w, d_b = torch.ops.retnet.head_norm_gate_backward(
            grad.contiguous(), o_full, floor, g, weight, bias, ctx.eps)
        return d_o, None, d_g, d_w, d_b, None, d_out_weight


def head_norm_gate(o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                   eps: float, out_weight: Tensor | None = None) -> Tensor:
    """o_full [B, T, H, V+1], floor [B, T, H] (or broadcastable), g [B, T, H·V] → [B, T, D]
    through out_weight [D, H·V], or [B, T, H·V] without it."""
    floor = floor.expand(o_full.shape[:-1]).contiguous()
    return HeadNormGate.apply(o_full.contiguous(), floor, g.contiguous(), weight.contiguous(),
                              bias.contiguous(), float(eps), out_weight)
