"""The fused output stage of a retention layer (division by the score sum, GroupNorm, gate;
`kernels/cpu/head_norm.h`) against the float64 PyTorch expression, values and every gradient,
and the layer's choice of it through the dispatch table and its switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import rel_err
from retnet import kernels
from retnet.kernels.dispatch import choose

EPS = 1e-5


def fused_head_norm_gate(o_full, floor, g, weight, bias, eps, out_weight=None):
    """The output stage through the fast path the dispatch table chooses, or None."""
    args = (o_full, floor, g, weight, bias, eps, out_weight)
    fast = choose("head_norm_gate", *args)
    return None if fast is None else fast(*args)


def _reference(o_full, floor, g, weight, bias, out_weight=None):
    """The expression modules/retention.py computes, in float64."""
    o_full, floor, g, weight, bias = (t.double() for t in (o_full, floor, g, weight, bias))
    B, T, H, V1 = o_full.shape
    o, z = o_full.split([V1 - 1, 1], dim=-1)
    x = o / torch.maximum(z.abs(), floor.unsqueeze(-1))
    y = F.group_norm(x.reshape(B * T, H * (V1 - 1)), H, weight, bias, EPS)
    out = F.silu(g) * y.view(B, T, -1)
    return out if out_weight is None else F.linear(out, out_weight.double())


def _inputs(B, T, H, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    o_full = torch.randn(B, T, H, V + 1, generator=gen)
    floor = torch.rand(B, T, H, generator=gen) + 0.5
    o_full[0, 0, :, V] = 0  # a padded position: score sum 0, the floor wins
    o_full[-1, -1, 0, V] = -3.0  # a negative score sum that wins
    o_full[-1, 0, -1, V] = floor[-1, 0, -1]  # a tie: half the gradient, as torch.maximum
    g = torch.randn(B, T, H * V, generator=gen)
    weight = torch.randn(H * V, generator=gen)
    bias = torch.randn(H * V, generator=gen)
    return [t.requires_grad_() for t in (o_full, floor, g, weight, bias)]


# V not a multiple of the 16-lane vector, one row, several heads; with and without W_O
@pytest.mark.parametrize("project", [False, True], ids=["alone", "with-W_O"])
@pytest.mark.parametrize("B,T,H,V", [(1, 1, 1, 16), (2, 5, 3, 37), (3, 7, 2, 64)])
def test_values_and_gradients_equal_the_float64_expression(B, T, H, V, project):
    args = _inputs(B, T, H, V)
    out_weight = torch.randn(11, H * V, requires_grad=True) if project else None
    kernels.set_enabled(True)
    try:
        out = fused_head_norm_gate(*args, EPS, out_weight)
    finally:
        kernels.set_enabled(None)
    assert out is not None and out.grad_fn.name() == "HeadNormGateBackward"
    want = _reference(*args, out_weight)
    assert rel_err(out, want) < 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    names = ("o_full", "g", "weight", "bias", "out_weight")
    wrt = [args[0], args[2], args[3], args[4]] + ([out_weight] if project else [])
    got = torch.autograd.grad(out, wrt, grad)
    ref = torch.autograd.grad(want, wrt, grad.double())
    for name, a, b in zip(names, got, ref):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-W_O", "trained-W_O"])
def test_a_lora_update_on_w_o_equals_it_written_out(frozen):
    """W_O with a LoRA update inside the kernel's Function: the float64 expression plus
    s·(y Aᵀ)Bᵀ written out, value and every gradient (A and B included) to float32 1e-5."""
    from retnet.ops.low_rank import LowRank

    B, T, H, V = 2, 5, 3, 37
    args = _inputs(B, T, H, V)
    gen = torch.Generator().manual_seed(4)
    out_weight = torch.randn(11, H * V, generator=gen).requires_grad_(not frozen)
    a = torch.randn(4, H * V, generator=gen).requires_grad_()
    b = torch.randn(11, 4, generator=gen).requires_grad_()
    kernels.set_enabled(True)
    try:
        fast = choose("head_norm_gate", *args, EPS, out_weight, low=LowRank(a, b, 0.5))
        assert fast is not None
        out = fast(*args, EPS, out_weight, low=LowRank(a, b, 0.5))
    finally:
        kernels.set_enabled(None)
    y = _reference(*args)
    want = y @ out_weight.double().T + 0.5 * (y @ a.double().T) @ b.double().T
    assert rel_err(out, want) < 1e-5
    grad = torch.randn(out.shape, generator=gen)
    wrt = [args[0], args[2], args[3], args[4], a, b] + ([] if frozen else [out_weight])
    for a_, b_ in zip(torch.autograd.grad(out, wrt, grad),
                      torch.autograd.grad(want, wrt, grad.double())):
        assert rel_err(a_, b_) < 1e-5


def test_declines_what_it_does_not_take():
    """float64, bf16 and the switch off leave the layer to the PyTorch expression."""
    args = _inputs(1, 3, 2, 16)
    kernels.set_enabled(True)
    try:
        assert fused_head_norm_gate(*(t.double() for t in args), EPS) is None
        assert fused_head_norm_gate(args[0], args[1], args[2].bfloat16(), *args[3:], EPS) is None
        kernels.set_enabled(False)
        assert fused_head_norm_gate(*args, EPS) is None
    finally:
        kernels.set_enabled(None)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_a_layer_uses_it_where_enabled(fast):
    """The tiny model's retention layers run their output stage and W_O through the kernel
    exactly when the switch is on (the model-level gradients are in
    tests/ops/test_ops_chunkwise.py)."""
    from retnet import RetNetConfig, RetNetLM

    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=50))
    names: list[str] = []
    for block in model.blocks:  # what made each retention layer's output
        block.retention.register_forward_hook(
            lambda module, inputs, output: names.append(output[0].grad_fn.name()))
    kernels.set_enabled(fast)
    try:
        model(torch.randint(0, 50, (2, 9)), mode="chunkwise", chunk_size=4)
    finally:
        kernels.set_enabled(None)
    assert len(names) == len(model.blocks)
    assert all((n == "HeadNormGateBackward") == fast for n in names), names
