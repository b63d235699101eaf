"""down(act(h)), an FFN's activation and output projection; under autograd, the Function of
`retnet.kernels.activation` that keeps h and not act(h) as well, where
`retnet.kernels.dispatch` chooses it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.ops.linear import linear

ACTIVATIONS = {"gelu": F.gelu, "swish": F.silu}


def act_linear(h: Tensor, weight: Tensor, kind: str) -> Tensor:
    """linear(act(h), weight) for act "gelu" or "swish"; h [..., hidden], weight [out, hidden]."""
    fast = choose("act_linear", h, weight)
    if fast is not None:
        return fast(h, weight, kind)
    return linear(ACTIVATIONS[kind](h), weight)
