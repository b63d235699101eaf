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

from retnet.ops.low_rank import LowRank, add_low_rank, low_rank_grads

_BACKWARD = {"gelu": lambda grad, h: torch.ops.aten.gelu_backward(grad, h),
             "swish": lambda grad, h: torch.ops.aten.silu_backward(grad, h)}
_FORWARD = {"gelu": F.gelu, "swish": F.silu}


class _ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, kind: str, scale: float | None,
                *low: Tensor) -> Tensor:
        """low: A [r, hidden] and B [out, r] of a LoRA update when scale is not None."""
        ctx.save_for_backward(h, weight, *low)
        ctx.kind, ctx.scale = kind, scale
        a = _FORWARD[kind](h)
        y = F.linear(a, weight)
        return y if scale is None else add_low_rank(y, a, LowRank(*low, scale))

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, *low = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # [N, out]
        a = None
        if needs[1] or low:
            a = _FORWARD[ctx.kind](h).reshape(g.shape[0], -1)  # [N, hidden], recomputed
        grad_w = g.t().mm(a) if needs[1] else None
        grad_a = g.mm(weight)  # [N, hidden]
        grad_low: tuple[Tensor | None, ...] = ()
        if low:  # y += s·(a Aᵀ) Bᵀ: dA = (s g B)ᵀ a, dB = s gᵀ (a Aᵀ)
            g_low, grad_b = low_rank_grads(g, a, LowRank(*low, ctx.scale))
            grad_low = (g_low.t().mm(a), grad_b)
            grad_a.addmm_(g_low, low[0])
        grad_h = _BACKWARD[ctx.kind](grad_a.view(h.shape), h) if needs[0] else None
        return grad_h, grad_w, None, None, *grad_low


def act_linear(h: Tensor, weight: Tensor, kind: str, low: LowRank | None = None) -> Tensor:
    """F.linear(act(h), weight) (+ the LoRA update `low`) for act "gelu" or "swish", h [...,
    hidden], weight [out, hidden] of h's dtype; h, the weight and the LoRA factors are all it
    keeps for the backward (act(h), LoRA's input too, is recomputed there)."""
    if low is None:
        return _ActLinear.apply(h, weight, kind, None)
    return _ActLinear.apply(h, weight, kind, float(low.scale), low.a.to(h.dtype),
                            low.b.to(h.dtype))
