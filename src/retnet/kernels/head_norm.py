"""The CPU kernel of a retention layer's output stage (`kernels/cpu/head_norm.h`) as an
autograd Function: silu(g) ⊙ GroupNorm(o / max(|z|, floor)) in one pass, forward and
backward, keeping o and g for the backward instead of autograd's four tensors. The PyTorch
expression in `retnet.modules.retention` is the reference (tests/test_head_norm.py)."""

from __future__ import annotations

import torch
from torch import Tensor


class HeadNormGate(torch.autograd.Function):
    """(o_full [..., H, V+1], floor [..., H], g [..., H·V], weight, bias [H·V], eps) ->
    [..., H·V], all contiguous float32 on the CPU."""

    @staticmethod
    def forward(ctx, o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                eps: float) -> Tensor:
        ctx.save_for_backward(o_full, floor, g, weight, bias)
        ctx.eps = eps
        return torch.ops.retnet.head_norm_gate(o_full, floor, g, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        o_full, floor, g, weight, bias = ctx.saved_tensors
        d_o, d_g, d_w, d_b = torch.ops.retnet.head_norm_gate_backward(
            grad.contiguous(), o_full, floor, g, weight, bias, ctx.eps)
        return d_o, None, d_g, d_w, d_b, None


def head_norm_gate(o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor, bias: Tensor,
                   eps: float) -> Tensor:
    """o_full [B, T, H, V+1], floor [B, T, H] (or broadcastable), g [B, T, H·V] → [B, T, H·V]."""
    floor = floor.expand(o_full.shape[:-1]).contiguous()
    return HeadNormGate.apply(o_full.contiguous(), floor, g.contiguous(), weight.contiguous(),
                              bias.contiguous(), float(eps))
