"""The rotation of queries and keys (`retnet.ops.rotary`) against the real-valued formula
written out here in float64: each pair (x_2j, x_2j+1) turned by position · θ_j."""

import math

import pytest
import torch

from retnet.ops.rotary import rotary_factors, rotate


def reference(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(x0 cos a − x1 sin a, x1 cos a + x0 sin a), a = p · 10000^(−j / (K/2 − 1)), float64."""
    B, T, H, K = x.shape
    out = torch.empty(B, T, H, K, dtype=torch.float64)
    x = x.double()
    for j in range(K // 2):
        theta = 10000.0 ** (-j / (K // 2 - 1))
        a = positions.double()[:, :, None] * theta  # [B, T, 1]
        x0, x1 = x[..., 2 * j], x[..., 2 * j + 1]
        out[..., 2 * j] = x0 * a.cos() - x1 * a.sin()
        out[..., 2 * j + 1] = x1 * a.cos() + x0 * a.sin()
    return out


def positions(B: int, T: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + T).repeat(B, 1) + torch.arange(B)[:, None]


def test_float64_matches_the_real_formula():
    x = torch.randn(2, 9, 3, 10, dtype=torch.float64)
    p = positions(2, 9, start=1000)
    y = rotate(x, rotary_factors(p, 10, torch.float64))
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, reference(x, p), rtol=0, atol=1e-12)


def test_float32_matches_the_real_formula():
    x = torch.randn(2, 9, 3, 10)
    p = positions(2, 9)  # small positions: the float32 angle is exact to ~1e-6
    y = rotate(x, rotary_factors(p, 10, torch.float32))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, p), rtol=0, atol=2e-5)


def test_a_scale_folded_into_the_factors_scales_the_result():
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    factors = rotary_factors(positions(1, 5), 8, torch.float64)
    torch.testing.assert_close(rotate(x, factors * 0.3), 0.3 * rotate(x, factors),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_strided_and_low_precision_inputs(offset):
    """A column slice of a wider tensor (odd offsets cannot be viewed as complex pairs) and
    a bf16 input are rotated like any other values: against the formula."""
    wide = torch.randn(2, 6, 3, 16 + 3)
    x = wide[..., offset:offset + 16]
    p = positions(2, 6)
    factors = rotary_factors(p, 16)
    torch.testing.assert_close(rotate(x, factors).double(), reference(x, p), rtol=0, atol=2e-5)
    low = x.to(torch.bfloat16)
    y = rotate(low, factors)
    assert y.dtype == torch.float32  # computed and returned in the factors' precision
    torch.testing.assert_close(y.double(), reference(low.float(), p), rtol=0, atol=2e-5)


def test_gradients():
    x = torch.randn(1, 4, 2, 6, dtype=torch.float64, requires_grad=True)
    factors = rotary_factors(positions(1, 4, start=7), 6, torch.float64) * math.sqrt(0.5)
    assert torch.autograd.gradcheck(lambda t: rotate(t, factors), (x,))
