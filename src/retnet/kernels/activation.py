"""down(act(h)): an FFN's activation and output projection with a backward that keeps h and
the weight, not act(h) as well: the fast path of `retnet.ops.activation` under autograd (chosen
by `retnet.kernels.dispatch`).

Autograd's F.linear(F.gelu(h), w) saves h (for GELU's backward) and act(h) (for the weight's
gradient): two [B, T, hidden] tensors per layer, 0.5 GiB of a small-preset training step at
8192 tokens. This function saves h and recomputes act(h) in the backward (one elementwise
pass), then runs the same products and ATen's own activation backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_BACKWARD = {"gelu": lambda grad, h: torch.ops.aten.gelu_backward(grad, h),
             "swish": lambda grad, h: torch.ops.aten.silu_backward(grad, h)}
_FORWARD = {"gelu": F.gelu, "swish": F.silu}


class _ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, kind: str) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.kind = kind
        return F.linear(_FORWARD[kind](h), weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[1]:
            a = _FORWARD[ctx.kind](h)  # [..., hidden], recomputed
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(a.reshape(-1, a.shape[-1]))
        if ctx.needs_input_grad[0]:
            grad_h = _BACKWARD[ctx.kind](grad.matmul(weight), h)
        return grad_h, grad_w, None


def act_linear(h: Tensor, weight: Tensor, kind: str) -> Tensor:
    """F.linear(act(h), weight) for act "gelu" or "swish", h [..., hidden], weight [out,
    hidden] of h's dtype; h and the weight are all it keeps for the backward."""
    return _ActLinear.apply(h, weight, kind)
