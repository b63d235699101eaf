"""The retention output gate's own backward (`retnet.kernels.gate.silu_gate`) against autograd's
silu(g) * o: values and gradients, float64 gradcheck, mixed dtypes, and what it keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retnet.kernels.gate import silu_gate


def _inputs(dtype=torch.float64, shape=(2, 5, 12)):
    g = torch.randn(shape, dtype=dtype, requires_grad=True)
    o = torch.randn(shape, dtype=dtype, requires_grad=True)
    return g, o


def test_gradcheck_float64():
    assert torch.autograd.gradcheck(silu_gate, _inputs(), eps=1e-6, atol=1e-8)


def test_values_and_gradients_equal_the_plain_expression_float32():
    g, o = _inputs(torch.float32, (3, 7, 40))
    grad = torch.randn(3, 7, 40)
    out = silu_gate(g, o)
    dg, do = torch.autograd.grad(out, (g, o), grad)
    ref = F.silu(g) * o
    rg, ro = torch.autograd.grad(ref, (g, o), grad)
    # autograd's own steps in its order: equal bit for bit, so training curves do not move
    assert torch.equal(out, ref) and torch.equal(dg, rg) and torch.equal(do, ro)


def test_mixed_bf16_gate_and_float32_values_promote_like_the_plain_expression():
    g = torch.randn(4, 16).bfloat16().requires_grad_()
    o = torch.randn(4, 16, requires_grad=True)
    out = silu_gate(g, o)
    assert out.dtype == (F.silu(g) * o).dtype == torch.float32
    dg, do = torch.autograd.grad(out.sum(), (g, o))
    assert dg.dtype == torch.bfloat16 and do.dtype == torch.float32
    reference = torch.autograd.grad((F.silu(g) * o).sum(), (g, o))
    assert torch.equal(dg, reference[0]) and torch.equal(do, reference[1])


def test_it_keeps_two_tensors_for_the_backward_not_three():
    saved = []
    g, o = _inputs(torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        silu_gate(g, o)
    assert len(saved) == 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.silu(g) * o
    assert len(saved) == 3  # what the plain expression keeps
