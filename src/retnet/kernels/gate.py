"""The retention output gate silu(g) ⊙ o with a backward that keeps two tensors, not three:
the fast path of `retnet.ops.gate.silu_gate` under autograd (chosen by
`retnet.kernels.dispatch`).

Autograd's silu(g) * o saves g (for SiLU's backward) and both factors of the product: three
[B, T, H·V] tensors per layer, 0.75 GiB of a small-preset training step at 8192 tokens. This
function saves g and o and recomputes silu(g) in the backward, running autograd's own steps
(the product's backward, then ATen's silu_backward), so values and gradients equal the plain
expression's bit for bit (tests/ops/test_ops_gate.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """silu(g) * o (broadcasting and type promotion as the plain expression); g and o are all
    it keeps for the backward."""
    return _SiluGate.apply(g, o)
