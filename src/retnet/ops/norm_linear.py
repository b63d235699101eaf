"""LayerNorm followed by several projections of its output; under autograd, the Function of
`retnet.kernels.norm_linear` that keeps the norm's input and not its output as well, where
`retnet.kernels.dispatch` chooses it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.ops.linear import linear
from retnet.ops.low_rank import LowRank, add_low_rank


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      weights: list[Tensor], lows: list[LowRank | None] | None = None
                      ) -> list[Tensor]:
    """[linear(layer_norm(x), w) (+ its LoRA update) for w in weights]; x [..., D], weights
    [OUT_i, D]; lows: each weight's `LowRank` update or None (default: none)."""
    lows = lows or [None] * len(weights)
    fast = choose("layer_norm_linear", x, *weights, *(t for lo in lows if lo for t in lo[:2]))
    if fast is not None:
        return fast(x, norm_weight, norm_bias, eps, weights, lows)
    xn = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return [linear(xn, w) if lo is None else add_low_rank(linear(xn, w), xn, lo)
            for w, lo in zip(weights, lows)]
