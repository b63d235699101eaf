"""LayerNorm followed by several projections of its output; under autograd, the Function of
`retnet.kernels.norm_linear` that keeps the norm's input and not its output as well, where
`retnet.kernels.dispatch` chooses it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.ops.linear import linear


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      weights: list[Tensor]) -> list[Tensor]:
    """[linear(layer_norm(x), w) for w in weights]; x [..., D], weights [OUT_i, D]."""
    fast = choose("layer_norm_linear", x, *weights)
    if fast is not None:
        return fast(x, norm_weight, norm_bias, eps, weights)
    xn = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return [linear(xn, w) for w in weights]
