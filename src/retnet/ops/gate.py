"""The retention output gate silu(g) ⊙ o with a backward that keeps two tensors, not three.

Autograd's silu(g) * o saves g (for SiLU's backward) and both factors of the product: three
[B, T, H·V] tensors per layer, 0.75 GiB of a small-preset training step at 8192 tokens. This
function saves g and o and recomputes silu(g) in the backward, running autograd's own steps
(the product's backward, then ATen's silu_backward), so values and gradients equal the plain
expression's bit for bit (tests/test_ops_gate.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Fused forms of a retention layer's output stage by backend, (o_full [B, T, H, V+1], floor
# [B, T, H], g [B, T, H·V], weight, bias [H·V], eps, out_weight [D, H·V] or None) ->
# silu(g) ⊙ GroupNorm(o / max(|z|, floor)) [B, T, H·V], projected by out_weight when given,
# or None to decline; retnet.kernels registers "cpu". This module imports no other retnet
# module (the HF export bundles it).
FAST_HEAD_NORM_GATE: dict[str, Callable[..., Tensor | None]] = {}


def fused_head_norm_gate(o_full: Tensor, floor: Tensor, g: Tensor, weight: Tensor,
                         bias: Tensor, eps: float, out_weight: Tensor | None = None
                         ) -> Tensor | None:
    """The first registered fast path that takes these tensors, else None."""
    for fn in FAST_HEAD_NORM_GATE.values():
        out = fn(o_full, floor, g, weight, bias, eps, out_weight)
        if out is not None:
            return out
    return None


class _SiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, o: Tensor) -> Tensor:
        ctx.save_for_backward(g, o)
        return F.silu(g) * o

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        # autograd's own steps for silu(g) * o, in its order: the product's backward (cast to
        # each factor's dtype), then SiLU's backward kernel; only silu(g) is recomputed
        g, o = ctx.saved_tensors
        grad_g = grad_o = None
        if ctx.needs_input_grad[0]:
            grad_g = torch.ops.aten.silu_backward((grad * o).to(g.dtype), g)
        if ctx.needs_input_grad[1]:
            grad_o = (grad * F.silu(g)).to(o.dtype)
        return grad_g, grad_o


def silu_gate(g: Tensor, o: Tensor) -> Tensor:
    """silu(g) * o (broadcasting and type promotion as the plain expression); under autograd,
    g and o are all it keeps for the backward."""
    if not torch.is_grad_enabled() or not (g.requires_grad or o.requires_grad):
        return F.silu(g) * o
    return _SiluGate.apply(g, o)
