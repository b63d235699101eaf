"""The mean next-token cross-entropy of an LM head's logits hidden @ Wᵀ: by default through the
chunked cross-entropy of `retnet.kernels.loss`, which never holds the [tokens, vocab] logits or
their gradient; where `retnet.kernels.dispatch` declines it (the switch off), the plain loss
over the whole logits, below."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retnet.kernels.dispatch import choose


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> Tensor:
    """mean cross-entropy of (hidden @ weightᵀ) against targets.

    hidden [..., D] (any dtype; computed in float32, float64 for float64 inputs); weight
    [V, D]; targets [...] of the same leading shape, `ignore_index` for no target. chunk_rows:
    rows per chunk of the chunked path (default: logits of about 32 MiB). Autocast does not
    apply: the products run in the compute dtype, so the loss is that of the plain float32
    head."""
    rows = hidden.shape[:-1].numel()
    if rows != targets.numel():
        raise ValueError(f"hidden has {rows} rows but targets {targets.numel()}")
    fast = choose("linear_cross_entropy", hidden, weight)
    if fast is not None:
        return fast(hidden, weight, targets, ignore_index=ignore_index, chunk_rows=chunk_rows)
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).t()
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
