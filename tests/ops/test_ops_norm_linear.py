"""LayerNorm then projections with the backward that recomputes the norm's output
(retnet.kernels.norm_linear) against the plain expression, and where the blocks use it."""

import pytest
import torch
import torch.nn.functional as F

from retnet.kernels.norm_linear import layer_norm_linear


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g, dtype=dtype)
    nw, nb = torch.randn(37, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
    ws = [torch.randn(n, 37, generator=g, dtype=dtype) for n in (11, 4, 20)]
    return [t.requires_grad_() for t in (x, nw, nb, *ws)]


def _plain(x, nw, nb, *ws):
    xn = F.layer_norm(x, (x.shape[-1],), nw, nb, 1e-5)
    return [F.linear(xn, w) for w in ws]


def test_values_bit_for_bit_and_gradients_to_1e_6():
    x, nw, nb, *ws = _case(torch.float32)
    got = layer_norm_linear(x, nw, nb, 1e-5, ws)
    want = _plain(x, nw, nb, *ws)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g) for o in want]
    inputs = (x, nw, nb, *ws)
    for name, a, b in zip("x norm_weight norm_bias w0 w1 w2".split(),
                          torch.autograd.grad(got, inputs, grads),
                          torch.autograd.grad(want, inputs, grads)):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), name


def test_gradcheck_float64():
    x, nw, nb, *ws = _case(torch.float64)
    x, ws = x[:1, :2].detach().requires_grad_(), [w[:3].detach().requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda x, nw, nb, *ws: layer_norm_linear(x, nw, nb, 1e-5, ws),
                                    (x, nw, nb, *ws))


def test_blocks_use_it_under_autograd_only(kernels_on):
    """A training forward's projections come out of the function (all four of retention's
    and the FFN's up); without grad, or under autocast, the plain modules run."""
    from retnet.modules.linear import Linear, project

    block_norm = torch.nn.LayerNorm(8)
    linears = [Linear(8, 3), Linear(8, 5)]
    x = torch.randn(2, 4, 8)
    outs = project(x, block_norm, linears)
    assert all(o.grad_fn.name() == "_LayerNormLinearBackward" for o in outs)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(project(x, block_norm, linears), outs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(o.dtype == torch.bfloat16 for o in project(x, block_norm, linears))


def _lora_case(frozen: bool):
    """float64 x, norm, three weights (frozen or not) and LoRA factors on the first and last."""
    x, nw, nb, *ws = _case(torch.float64)
    g = torch.Generator().manual_seed(2)
    lows = [(torch.randn(3, 37, generator=g, dtype=torch.float64).requires_grad_(),
             torch.randn(w.shape[0], 3, generator=g, dtype=torch.float64).requires_grad_(), s)
            for w, s in ((ws[0], 0.5), (ws[2], 2.0))]
    ws = [w.detach().requires_grad_(not frozen) for w in ws]
    return x, nw, nb, ws, lows


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-weights", "trained-weights"])
def test_lora_updates_inside_the_function_equal_them_written_out(frozen):
    """LoRA on the first and last projection: x Wᵀ + s·(xn Aᵀ)Bᵀ written out by hand, the
    values and every gradient (x, norm, A, B, and W when trained) to float64 1e-12."""
    from retnet.ops.low_rank import LowRank

    x, nw, nb, ws, ((a0, b0, s0), (a2, b2, s2)) = _lora_case(frozen)
    got = layer_norm_linear(x, nw, nb, 1e-5, ws, [LowRank(a0, b0, s0), None, LowRank(a2, b2, s2)])
    xn = F.layer_norm(x, (37,), nw, nb, 1e-5)
    want = [xn @ ws[0].T + s0 * (xn @ a0.T) @ b0.T, xn @ ws[1].T,
            xn @ ws[2].T + s2 * (xn @ a2.T) @ b2.T]
    inputs = [x, nw, nb, a0, b0, a2, b2] + ([] if frozen else ws)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in want]
    for a, b in zip([*got, *torch.autograd.grad(got, inputs, grads)],
                    [*want, *torch.autograd.grad(want, inputs, grads)]):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_lora_gradcheck_float64():
    from retnet.ops.low_rank import LowRank

    x, nw, nb, ws, ((a0, b0, s0), _) = _lora_case(frozen=True)
    x = x[:1, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a, b: layer_norm_linear(x, nw, nb, 1e-5, ws[:2], [LowRank(a, b, s0), None]),
        (x, a0, b0))
