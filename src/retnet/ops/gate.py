"""The retention output gate silu(g) ⊙ o; under autograd, the Function of `retnet.kernels.gate`
that keeps two tensors for the backward instead of three, where `retnet.kernels.dispatch`
chooses it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose


def silu_gate(g: Tensor, o: Tensor) -> Tensor:
    """silu(g) * o (broadcasting and type promotion as the plain expression)."""
    fast = choose("silu_gate", g, o)
    if fast is not None:
        return fast(g, o)
    return F.silu(g) * o
