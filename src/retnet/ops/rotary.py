"""Rotation of queries and keys by absolute position (torchscale's layout, without xPos scaling)."""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_dim: int, dtype: torch.dtype = torch.float32
                  ) -> tuple[Tensor, Tensor]:
    """cos and sin of position · θ_i with θ = 10000^(−linspace(0, 1, K/2)), each pair interleaved.

    positions [B, T] (int); dtype: float64 forms the angles in float64, anything else in
    float32 (an angle grows with the position, so it is never formed in low precision: at
    position 10^5 a float32 angle is already off by up to 4e-3 rad). θ is computed in float64
    and rounded once. Returns cos, sin [B, T, 1, K] in that dtype.
    """
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = inverse_frequencies(head_dim, dtype, positions.device)
    angles = positions.to(dtype)[..., None] * inv_freq  # [B, T, K/2]
    angles = angles.repeat_interleave(2, dim=-1).unsqueeze(2)  # [B, T, 1, K]
    return angles.cos(), angles.sin()


def inverse_frequencies(head_dim: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """θ_i = 10000^(−linspace(0, 1, K/2)), [K/2], computed in float64 and rounded once to dtype."""
    theta = 10000.0 ** -torch.linspace(0, 1, head_dim // 2, device=device, dtype=torch.float64)
    return theta.to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) → (x0 cos − x1 sin, x1 cos + x0 sin).

    x [B, T, H, K]; cos, sin [B, T, 1, K]. Computed in float32 or higher, returned in that dtype.
    """
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x = x.to(dtype)
    pairs = x.unflatten(-1, (-1, 2))  # [B, T, H, K/2, 2]
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(dtype) + swapped * sin.to(dtype)
