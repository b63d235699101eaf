"""x Wᵀ for the projections: F.linear, or the split matrix-vector product of
`retnet.kernels.gemv` where `retnet.kernels.dispatch` chooses it (one float32 row on a CPU)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weightᵀ with weight [out, in] (any memory layout); returns [..., out]."""
    fast = choose("linear", x, weight)
    if fast is not None:
        return fast(x, weight)
    return F.linear(x, weight)

