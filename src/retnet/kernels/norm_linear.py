"""LayerNorm followed by several projections of its output, with a backward that keeps the
LayerNorm's input, not its output as well: the fast path of `retnet.ops.norm_linear` under
autograd (chosen by `retnet.kernels.dispatch`).

In a block, LN(x) feeds q, k, v and g (or the FFN's up projection); autograd saves x for
the norm's backward and LN(x) for the projections' weight gradients: one more [B, T, D]
tensor per norm, 0.25 GiB of a small-preset training step at 8192 tokens. This function
recomputes LN(x) from x and the saved statistics in the backward (one elementwise pass), then
runs the projections' products and ATen's own LayerNorm backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retnet.ops.low_rank import LowRank, add_low_rank, low_rank_grads


class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                scales: tuple[float | None, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
        """tensors: the n weights, then A and B of each weight whose scale is not None."""
        D, n = x.shape[-1], len(scales)
        xn, mean, rstd = torch.native_layer_norm(x, (D,), norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, *tensors)
        ctx.eps, ctx.scales = eps, scales
        lows = _lows(scales, tensors[n:])
        return tuple(F.linear(xn, w) if lo is None else add_low_rank(F.linear(xn, w), xn, lo)
                     for w, lo in zip(tensors[:n], lows))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, norm_weight, norm_bias, mean, rstd, *tensors = ctx.saved_tensors
        D, n = x.shape[-1], len(ctx.scales)
        xn = torch.native_layer_norm(x, (D,), norm_weight, norm_bias, ctx.eps)[0]  # recomputed
        flat = xn.reshape(-1, D)
        needs = ctx.needs_input_grad[5:]
        grad_tensors: list[Tensor | None] = [None] * len(tensors)
        grad_xn, low_at = None, n
        for i, (grad, weight, lo) in enumerate(zip(grads, tensors[:n],
                                                   _lows(ctx.scales, tensors[n:]))):
            g = grad.reshape(-1, grad.shape[-1])  # [N, OUT]
            if needs[i]:
                grad_tensors[i] = g.t().mm(flat)
            part = g.mm(weight)  # [N, D]
            if lo is not None:  # y += s·(xn Aᵀ) Bᵀ: dB = s gᵀ(xn Aᵀ), dA = (s g B)ᵀ xn
                g_low, grad_b = low_rank_grads(g, flat, lo)
                grad_tensors[low_at] = g_low.t().mm(flat)
                grad_tensors[low_at + 1] = grad_b
                part.addmm_(g_low, lo.a)
                low_at += 2
            grad_xn = part if grad_xn is None else grad_xn.add_(part)
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            grad_xn.view(x.shape), x, [D], mean, rstd, norm_weight, norm_bias,
            list(ctx.needs_input_grad[:3]))
        return dx, dw, db, None, None, *grad_tensors


def _lows(scales: tuple[float | None, ...], pairs: tuple[Tensor, ...]) -> list[LowRank | None]:
    """Each weight's LoRA update (A and B taken in order from `pairs`), or None."""
    it = iter(pairs)
    return [None if s is None else LowRank(next(it), next(it), s) for s in scales]


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      weights: list[Tensor], lows: list[LowRank | None] | None = None
                      ) -> list[Tensor]:
    """[F.linear(layer_norm(x), w) (+ its LoRA update) for w in weights]; x [..., D], weights
    [OUT_i, D], lows: each weight's `LowRank` or None. It keeps x, the norm's statistics, the
    weights and the LoRA factors for the backward (LoRA's input, the norm's output, too is
    recomputed there)."""
    lows = lows or [None] * len(weights)
    scales = tuple(None if lo is None else float(lo.scale) for lo in lows)
    pairs = [t.to(x.dtype) for lo in lows if lo is not None for t in (lo.a, lo.b)]
    return list(_LayerNormLinear.apply(x, norm_weight, norm_bias, float(eps), scales, *weights,
                                       *pairs))
