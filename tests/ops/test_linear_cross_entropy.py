"""The chunked cross-entropy over the LM head (`retnet.kernels.loss`, the fast path of
`retnet.ops.loss.linear_cross_entropy`) against the plain one: the full logits, then
F.cross_entropy (a reference that never calls the code under test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retnet import kernels
from retnet.kernels.loss import chunked_cross_entropy
from retnet.ops.loss import linear_cross_entropy


def _plain(hidden, weight, targets, ignore_index=-100):
    logits = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64) @ weight.to(torch.float64).t()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)


def _case(dtype, n=37, d=12, v=50, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    if ignored:
        targets[::5] = -100  # padding / prompt positions
    return hidden, weight, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 100, None])
def test_float64_loss_and_gradients_equal_the_plain_loss(chunk_rows):
    hidden, weight, targets = _case(torch.float64)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    want = _plain(hidden, weight, targets)
    assert abs(got.item() - want.item()) <= 1e-10 * abs(want.item())
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


@pytest.mark.parametrize("chunk_rows", [5, None])
def test_float32_within_1e_5_of_the_float64_plain_loss(chunk_rows):
    hidden, weight, targets = _case(torch.float32, n=64, d=32, v=300)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    assert got.dtype == torch.float32
    want = _plain(hidden, weight, targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_an_upstream_gradient_scales_both_gradients():
    hidden, weight, targets = _case(torch.float64, ignored=False)
    got = 3.5 * chunked_cross_entropy(hidden, weight, targets, chunk_rows=4)
    want = 3.5 * _plain(hidden, weight, targets)
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_batched_shapes_and_no_grad_give_the_same_loss():
    hidden, weight, targets = _case(torch.float64, n=24)
    want = _plain(hidden, weight, targets).item()
    batched = chunked_cross_entropy(hidden.reshape(4, 6, -1), weight, targets.reshape(4, 6),
                                   chunk_rows=5)
    with torch.no_grad():
        evaluated = chunked_cross_entropy(hidden, weight, targets, chunk_rows=5)
    assert batched.item() == pytest.approx(want, rel=1e-12)
    assert evaluated.item() == pytest.approx(want, rel=1e-12) and not evaluated.requires_grad


def test_a_tied_weight_collects_both_gradients():
    """The LM head tied to the embedding: its gradient is the lookup's plus the head's."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    targets = torch.randint(0, 40, (2, 9), generator=g)

    def hidden():
        return torch.tanh(emb[ids])

    got = _grads(chunked_cross_entropy(hidden(), emb, targets, chunk_rows=4), emb)[0]
    want = _grads(F.cross_entropy((hidden() @ emb.t()).flatten(0, 1), targets.flatten()),
                  emb)[0]
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_bfloat16_hidden_states_are_scored_in_float32():
    hidden, weight, targets = _case(torch.bfloat16, n=16, d=16, v=64)
    got = chunked_cross_entropy(hidden, weight, targets)
    want = _plain(hidden.float(), weight.float(), targets)  # the bf16 values, exactly
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
    gh, gw = _grads(got, hidden, weight)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [True, False], ids=["chunked", "reference"])
def test_the_op_equals_the_plain_loss_on_either_path(fast):
    """`retnet.ops.loss.linear_cross_entropy` through the chunked path (switch on) or its own
    reference (off): the same float64 loss and gradients; mismatched rows refused on both."""
    hidden, weight, targets = _case(torch.float64)
    kernels.set_enabled(fast)
    try:
        got = linear_cross_entropy(hidden.view(1, 37, 12), weight, targets.view(1, 37))
        with pytest.raises(ValueError, match="rows"):
            linear_cross_entropy(hidden, weight, targets[:-1])
    finally:
        kernels.set_enabled(None)
    assert (got.grad_fn.name() == "_LinearCrossEntropyBackward") == fast
    want = _plain(hidden, weight, targets)
    assert (got - want).abs() <= 1e-12 * want.abs()
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_mismatched_rows_are_refused():
    hidden, weight, targets = _case(torch.float64)
    with pytest.raises(ValueError, match="rows"):
        chunked_cross_entropy(hidden, weight, targets[:-1])


@pytest.mark.parametrize("tie", [True, False])
def test_the_model_loss_equals_the_plain_loss_of_its_logits(tie):
    """model(ids, targets=t).loss and its parameter gradients against lm_loss of the logits,
    in float64, with padding and a chunked form."""
    from retnet import RetNetConfig, RetNetLM, lm_loss

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=97, tie_embeddings=tie)).double()
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    targets = torch.randint(0, 97, (2, 11)).masked_fill(mask == 0, -100)
    kw = {"attention_mask": mask, "mode": "chunkwise", "chunk_size": 4}
    got = model(ids, targets=targets, **kw)
    assert got.logits is None
    want = lm_loss(model(ids, **kw).logits, targets)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-12)
    params = [p for p in model.parameters()]
    for a, b in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want, params)):
        assert (a - b).abs().max() <= 1e-10 * max(b.abs().max(), 1e-30)
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=targets[:, :-1])


def test_fifty_training_steps_follow_the_plain_loss_curve():
    """float32, fixed seed: the chunked loss and the plain full-logits loss give the same
    curve through the one training step (≤ 1e-4 per step)."""
    from helpers import fifty_step_curve
    from retnet import lm_loss

    chunked = fifty_step_curve(
        lambda model, ids, t: model(ids, mode="chunkwise", chunk_size=8, targets=t).loss)
    plain = fifty_step_curve(
        lambda model, ids, t: lm_loss(model(ids, mode="chunkwise", chunk_size=8).logits, t))
    assert plain[-1] < plain[0] - 0.1  # it learns, so the curves are not flat
    assert max(abs(a - b) for a, b in zip(chunked, plain)) <= 1e-4


def test_a_frozen_head_gets_no_weight_gradient():
    """LoRA fine-tuning freezes the head: the chunked loss then neither computes nor keeps the
    [V, D] weight gradient (saved for backward), and the hidden gradient is unchanged."""
    hidden, weight, targets = _case(torch.float32)
    hidden.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        loss = chunked_cross_entropy(hidden, weight.detach(), targets, chunk_rows=8)
    assert tuple(weight.shape) not in {tuple(s) for s in saved}
    loss.backward()
    expected = hidden.detach().clone().requires_grad_(True)
    _plain(expected, weight.detach(), targets).backward()
    torch.testing.assert_close(hidden.grad, expected.grad, rtol=1e-5, atol=1e-6)
