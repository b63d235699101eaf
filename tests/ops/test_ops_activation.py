"""down(act(h)) with the backward that recomputes act(h) (retnet.kernels.activation) against the
plain expression: values bit for bit, gradients to 1e-6, and float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from retnet.kernels.activation import act_linear

ACT = {"gelu": F.gelu, "swish": F.silu}


@pytest.mark.parametrize("kind", ["gelu", "swish"])
def test_values_bit_for_bit_and_gradients_to_1e_6(kind):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 37, generator=g, requires_grad=True)
    w = torch.randn(11, 37, generator=g, requires_grad=True)
    grad = torch.randn(3, 5, 11, generator=g)
    got = act_linear(h, w, kind)
    assert got.grad_fn.name() == "_ActLinearBackward"
    want = F.linear(ACT[kind](h), w)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, w), grad),
                    torch.autograd.grad(want, (h, w), grad)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["gelu", "swish"])
def test_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: act_linear(h, w, kind), (h, w))


def test_the_block_uses_it_in_training_only(kernels_on):
    from retnet.modules.block import FeedForward

    ffn = FeedForward(8, 16)
    x = torch.randn(2, 3, 8)
    assert ffn(x).grad_fn.name() == "_ActLinearBackward"
    with torch.no_grad():
        assert torch.allclose(ffn(x), F.linear(F.gelu(ffn.up(x)), ffn.down.weight), atol=1e-6)


@pytest.mark.parametrize("kind", ["gelu", "swish"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-weight", "trained-weight"])
def test_a_lora_update_inside_the_function_equals_it_written_out(kind, frozen):
    """act(h) Wᵀ + s·(act(h) Aᵀ) Bᵀ written out by hand: the value and the gradients of h, A,
    B (and W when trained) to float64 1e-12; gradcheck too."""
    from retnet.ops.low_rank import LowRank

    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 37, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 37, generator=g, dtype=torch.float64, requires_grad=not frozen)
    a = torch.randn(4, 37, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = act_linear(h, w, kind, LowRank(a, b, 0.25))
    act = ACT[kind](h)
    want = act @ w.T + 0.25 * (act @ a.T) @ b.T
    inputs = (h, a, b) + (() if frozen else (w,))
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for x, y in zip([got, *torch.autograd.grad(got, inputs, grad)],
                    [want, *torch.autograd.grad(want, inputs, grad)]):
        assert (x - y).abs().max() <= 1e-12 * y.abs().max()
    small = h[:1, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, a, b: act_linear(h, w, kind, LowRank(a, b, 0.25)),
                                    (small, a, b))
