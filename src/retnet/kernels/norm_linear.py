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


class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                *weights: Tensor) -> tuple[Tensor, ...]:
        D = x.shape[-1]
        xn, mean, rstd = torch.native_layer_norm(x, (D,), norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, *weights)
        ctx.eps = eps
        return tuple(F.linear(xn, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, norm_weight, norm_bias, mean, rstd, *weights = ctx.saved_tensors
        D = x.shape[-1]
        xn = torch.native_layer_norm(x, (D,), norm_weight, norm_bias, ctx.eps)[0]  # recomputed
        flat = xn.reshape(-1, D)
        grad_weights, grad_xn = [], None
        for grad, weight, needed in zip(grads, weights, ctx.needs_input_grad[4:]):
            grad_weights.append(grad.reshape(-1, grad.shape[-1]).t().mm(flat) if needed
                                else None)
            part = grad.matmul(weight)
            grad_xn = part if grad_xn is None else grad_xn.add_(part)
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            grad_xn, x, [D], mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3]))
        return dx, dw, db, None, *grad_weights


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      weights: list[Tensor]) -> list[Tensor]:
    """[F.linear(layer_norm(x), w) for w in weights]; x [..., D], weights [OUT_i, D]. It keeps
    x, the norm's statistics and the weights for the backward."""
    return list(_LayerNormLinear.apply(x, norm_weight, norm_bias, float(eps), *weights))
