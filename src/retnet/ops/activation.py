"""down(act(h)), an FFN's activation and output projection; under autograd, the Function of
`retnet.kernels.activation` that keeps h and not act(h) as well, where
`retnet.kernels.dispatch` chooses it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.ops.linear import linear
from retnet.ops.low_rank import LowRank, add_low_rank

ACTIVATIONS = {"gelu": F.gelu, "swish": F.silu}


def act_linear(h: Tensor, weight: Tensor, kind: str, low: LowRank | None = None) -> Tensor:
    """linear(act(h), weight) (+ the LoRA update `low`) for act "gelu" or "swish"; h [...,
    hidden], weight [out, hidden]."""
    fast = choose("act_linear", h, weight, *(low[:2] if low else ()))
    if fast is not None:
        return fast(h, weight, kind, low)
    a = ACTIVATIONS[kind](h)
    return linear(a, weight) if low is None else add_low_rank(linear(a, weight), a, low)
