"""The LoRA update beside a projection (Hu et al. 2021, arXiv:2106.09685), defined once for the
module (`retnet.modules.lora`), the references of `retnet.ops` and the fused training paths of
`retnet.kernels` that take it (a module of its own: it imports nothing from retnet, so the
kernels can use it without a cycle through the dispatch table)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LowRank(NamedTuple):
    """A LoRA update beside a projection's weight W [out, in]: y = x Wᵀ + scale·(x Aᵀ) Bᵀ."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float  # alpha / r


def add_low_rank(y: Tensor, x: Tensor, low: LowRank) -> Tensor:
    """y [..., out] + low.scale·(x [..., in] Aᵀ) Bᵀ. The scale goes on the [..., r] product and
    B's product is added by one addmm: one [..., out] tensor, not three (update, scaled, sum)."""
    part = F.linear(x, low.a.to(x.dtype)) * low.scale  # [..., r]
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), part.reshape(-1, part.shape[-1]),
                       low.b.to(x.dtype).t())
    return flat.view(y.shape)


def low_rank_grads(g: Tensor, x: Tensor, lo: LowRank) -> tuple[Tensor, Tensor]:
    """For y += s·(x Aᵀ) Bᵀ with output gradient g [N, OUT] and input x [N, IN]: (s g B [N, r],
    dB = s gᵀ (x Aᵀ) [OUT, r]). Each product is written with the r rows first ([r, ·] @ [·, ·],
    then transposed): BLAS runs those several times faster than a product with r columns."""
    g_low = lo.b.t().mm(g.t()).t() * lo.scale  # [N, r]
    grad_b = (lo.a.mm(x.t())).mm(g).t() * lo.scale  # ((A xᵀ) g)ᵀ = gᵀ x Aᵀ  [OUT, r]
    return g_low, grad_b
