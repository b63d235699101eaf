"""Rotation of queries and keys by absolute position (torchscale's layout, without xPos scaling)."""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_factors(positions: Tensor, head_dim: int, dtype: torch.dtype = torch.float32
                   ) -> Tensor:
    """e^(i · position · θ_j) with θ = 10000^(−linspace(0, 1, K/2)): the rotation of
    each pair (x_2j, x_2j+1) as one complex factor.

    positions [B, T] (int); dtype: float64 forms the angles in float64, anything else in
    float32 (an angle grows with the position, so it is never formed in low precision: at
    position 10^5 a float32 angle is already off by up to 4e-3 rad). θ is computed in float64
    and rounded once. A scale multiplied into the factors costs no pass over x in `rotate`.
    Returns [B, T, 1, K/2], complex64 (complex128 for float64).
    """
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = inverse_frequencies(head_dim, dtype, positions.device)
    angles = positions.to(dtype)[..., None, None] * inv_freq  # [B, T, 1, K/2]
    return torch.polar(torch.ones_like(angles), angles)


def inverse_frequencies(head_dim: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """θ_i = 10000^(−linspace(0, 1, K/2)), [K/2], computed in float64 and rounded once to dtype."""
    theta = 10000.0 ** -torch.linspace(0, 1, head_dim // 2, device=device, dtype=torch.float64)
    return theta.to(dtype)


def rotate(x: Tensor, factors: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) → (x0 cos − x1 sin, x1 cos + x0 sin), times the
    factors' scale: one complex product per pair, a single pass over x (the real form, a swap
    and two products and a sum, took five).

    x [B, T, H, K]; factors [B, T, 1, K/2] from `rotary_factors`. Computed in the factors'
    real dtype (float32 or float64), returned in it as [B, T, H, K].
    """
    real = torch.float64 if factors.dtype == torch.complex128 else torch.float32
    x = x.to(real)
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # a complex view needs whole pairs
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [B, T, H, K/2]
    return torch.view_as_real(pairs * factors).flatten(-2)
