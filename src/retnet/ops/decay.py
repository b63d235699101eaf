"""Per-head decay rates γ and the decay row sum that the paper's normalisation divides by.

Everything is computed in float64 and handed out in float32 or higher: in bf16, γ = 1 − 2^-9
rounds to 1.0 and the decay vanishes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# "multiscale": the paper's experiments (§3.1), the same span for every model size.
# "eq8": the paper's eq. 8, γ_h = 1 − 2^(−5−h) (microsoft/torchscale).
# "none": γ = 1, no decay (an ablation). "single": γ = 127/128 for every head (an ablation).
DECAY_SCHEMES: tuple[str, ...] = ("multiscale", "eq8", "none", "single")


def log_decays(n_heads: int, scheme: str = "multiscale", *, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """log γ per head, [H], computed as log1p(−(1 − γ)) in float64.

    multiscale: 1 − γ = exp(linspace(log 1/32, log 1/512, H)), so γ spans 31/32 … 511/512.
    """
    if scheme == "multiscale":
        one_minus = torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_heads,
                                             dtype=torch.float64))
    elif scheme == "eq8":
        one_minus = 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
    elif scheme == "none":
        one_minus = torch.zeros(n_heads, dtype=torch.float64)
    elif scheme == "single":
        one_minus = torch.full((n_heads,), 1 / 128, dtype=torch.float64)
    else:
        raise ValueError(f"unknown decay scheme {scheme!r}; use one of {', '.join(DECAY_SCHEMES)}")
    return torch.log1p(-one_minus).to(device=device, dtype=dtype)


def decay_row_sum(positions: Tensor, log_decay: Tensor) -> Tensor:
    """c_n = Σ_(i=0..p_n) γ^i = (1 − γ^(p_n+1)) / (1 − γ): the row sum of the decay matrix.

    It depends only on the absolute position p_n, which is why the paper's decay
    normalisation can be applied identically in every form.
    positions [B, T] (int); log_decay [H]; returns [B, T, H] in log_decay's dtype.
    """
    p1 = (positions.to(log_decay.dtype) + 1).unsqueeze(-1)  # [B, T, 1]
    ratio = torch.expm1(p1 * log_decay) / torch.expm1(log_decay)
    # γ = 1 (no decay): the sum is simply p_n + 1.
    return torch.where(log_decay == 0, p1.expand_as(ratio), ratio)
