"""The chunkwise autograd Function (the training and prefill fast path) against the float64
per-token reference: outputs, final state and every gradient; through `Form` with the fast
path on and off; the model's gradients and a short training run."""

import pytest
import torch

from reference import reference_retention, rel_err
from retnet import kernels
from retnet.kernels.chunkwise import chunkwise_retention
from retnet.ops import Form, log_decays

B, T, H, K, V = 2, 29, 3, 4, 6


def _inputs(dtype, with_mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    log_decay = log_decays(H, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.ones(B, T, dtype=torch.float64)
        mask[0, :7] = 0  # left padding on row 0
        mask[1, 12] = 0  # and a hole in row 1
    return [t.to(dtype).requires_grad_() for t in (q, k, v, log_decay, state)] + [mask]


def _function(q, k, v, log_decay, state, mask, chunk_size):
    """The Function with the caller's part of the contract: a masked key writes nothing."""
    k = k if mask is None else k * mask[:, :, None, None].to(k.dtype)
    return chunkwise_retention(q, k, v, log_decay, state, mask, chunk_size)


def _value_and_grads(fn, q, k, v, log_decay, state, mask):
    """o, final state and the gradients of a fixed random functional of both."""
    o, final = fn(q, k, v, log_decay, state, mask)
    g = torch.Generator().manual_seed(7)
    w_o = torch.randn(o.shape, generator=g, dtype=torch.float64)
    if mask is not None:  # padded positions' outputs are not part of the contract
        w_o = w_o * mask[:, :, None, None]
    w_s = torch.randn(final.shape, generator=g, dtype=torch.float64)
    loss = (o.double() * w_o).sum() + (final.double() * w_s).sum()
    return o, final, torch.autograd.grad(loss, (q, k, v, log_decay, state))


# chunk sizes: 1, a non-divisor of T, a divisor of T + 1, T itself, longer than T
@pytest.mark.parametrize("chunk", [1, 3, 8, T, 64])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_float64_equals_the_per_token_reference(chunk, masked):
    args = _inputs(torch.float64, masked)
    o, s, grads = _value_and_grads(lambda *a: _function(*a, chunk), *args)
    o_ref, s_ref, grads_ref = _value_and_grads(reference_retention, *args)
    keep = slice(None) if args[-1] is None else args[-1].bool()
    assert rel_err(o[keep], o_ref[keep]) < 1e-12
    assert rel_err(s, s_ref) < 1e-12
    for name, got, want in zip("q k v log_decay state".split(), grads, grads_ref):
        assert rel_err(got, want) < 1e-12, name


# the products the Function skips when they are known to be zero: the read of a zero incoming
# state, the last chunk's write when the final state gets no gradient, the first chunk's share
# of the state's gradient when the state needs none
@pytest.mark.parametrize("zero_state", [False, True], ids=["state", "zero-state"])
@pytest.mark.parametrize("state_grad", [True, False], ids=["dstate", "no-dstate"])
@pytest.mark.parametrize("use_final", [True, False], ids=["dfinal", "no-dfinal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_skipped_products_change_nothing(zero_state, state_grad, use_final, masked):
    q, k, v, ld, state, mask = _inputs(torch.float64, masked)
    state = (torch.zeros_like(state) if zero_state else state.detach()).requires_grad_(
        state_grad)
    g = torch.Generator().manual_seed(5)

    def value_and_grads(fn):
        o, final = fn(q, k, v, ld, state, mask)
        w_o = torch.randn(o.shape, generator=g.manual_seed(5), dtype=torch.float64)
        w_o = w_o if mask is None else w_o * mask[:, :, None, None]
        loss = (o * w_o).sum() + (final.sum() * 0.3 if use_final else 0)
        inputs = (q, k, v, ld) + ((state,) if state_grad else ())
        return o, final, torch.autograd.grad(loss, inputs)

    o, s, grads = value_and_grads(lambda *a: _function(*a, 8))
    o_ref, s_ref, grads_ref = value_and_grads(reference_retention)
    keep = slice(None) if mask is None else mask.bool()
    assert rel_err(o[keep], o_ref[keep]) < 1e-12 and rel_err(s, s_ref) < 1e-12
    for name, got, want in zip("q k v log_decay state".split(), grads, grads_ref):
        assert rel_err(got, want) < 1e-12, name


@pytest.mark.parametrize("chunk", [2, 4])
def test_gradcheck(chunk):
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 7, 2, 2), (1, 7, 2, 2), (1, 7, 2, 3), (1, 2, 2, 3)]
    q, k, v, s0 = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                   for s in shapes)
    ld = log_decays(2, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v, ld, s: _function(q, k, v, ld, s, mask, chunk),
                                    (q, k, v, ld, s0))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_float32_form_within_1e_5_of_float64(fast, masked, monkeypatch):
    """Form("chunkwise") in float32, through whichever path the switch selects."""
    monkeypatch.setattr(kernels.switch, "_override", fast)
    args32 = _inputs(torch.float32, masked)
    o, s, grads = _value_and_grads(Form("chunkwise", 8), *args32)
    assert (o.grad_fn.name() == "ChunkwiseRetentionBackward") == fast
    args64 = _inputs(torch.float64, masked)
    o_ref, s_ref, grads_ref = _value_and_grads(reference_retention, *args64)
    keep = slice(None) if args64[-1] is None else args64[-1].bool()
    assert rel_err(o[keep], o_ref[keep]) < 1e-5 and rel_err(s, s_ref) < 1e-5
    for name, got, want in zip("q k v log_decay state".split(), grads, grads_ref):
        assert rel_err(got, want) < 1e-5, name


def test_float64_selects_the_reference():
    kernels.set_enabled(True)
    try:
        q, k, v, ld, s, mask = _inputs(torch.float64, False)
        o, _ = Form("chunkwise", 8)(q, k, v, ld, s, mask)
        assert o.grad_fn.name() != "ChunkwiseRetentionBackward"
    finally:
        kernels.set_enabled(None)


def test_model_gradients_equal_the_float64_parallel_form():
    """A tiny model's loss and every parameter gradient through the fast chunkwise path
    (float32, padding, a chunk that does not divide T) against the float64 parallel form."""
    from retnet import RetNetConfig, RetNetLM

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=97))
    reference = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=97)).double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :5] = 0
    targets = ids.roll(-1, 1).masked_fill(mask == 0, -100)
    kernels.set_enabled(True)
    try:
        got = model(ids, attention_mask=mask, targets=targets, mode="chunkwise", chunk_size=6)
    finally:
        kernels.set_enabled(None)
    want = reference(ids, attention_mask=mask, targets=targets, mode="parallel")
    assert abs(got.loss.item() - want.loss.item()) < 1e-5 * want.loss.item()
    got.loss.backward()
    want.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-4, name


@pytest.mark.slow
def test_fifty_training_steps_follow_the_reference_path():
    """float32, fixed seed: the fast chunkwise path and the reference give the same loss
    curve through the one training step (≤ 1e-4 per step)."""
    from helpers import fifty_step_curve

    def curve(fast: bool) -> list[float]:
        kernels.set_enabled(fast)
        try:
            return fifty_step_curve(lambda model, ids, t: model(
                ids, mode="chunkwise", chunk_size=8, targets=t).loss)
        finally:
            kernels.set_enabled(None)

    fast, reference = curve(True), curve(False)
    assert reference[-1] < reference[0] - 0.1  # it learns, so the curves are not flat
    assert max(abs(a - b) for a, b in zip(fast, reference)) <= 1e-4


@pytest.mark.slow
def test_bf16_autocast_training_follows_the_float32_curve():
    """`retnet train --dtype bfloat16` on a CPU: products in bf16, retention and its state in
    float32. Over 50 steps the loss stays within bf16's noise of float32's (≤ 0.05 nats a
    step, the last within 2%), and both learn."""
    from helpers import fifty_step_curve

    def loss_of(model, ids, t):
        return model(ids, mode="chunkwise", chunk_size=8, targets=t).loss

    f32 = fifty_step_curve(loss_of)
    bf16 = fifty_step_curve(loss_of, amp=torch.bfloat16)
    assert f32[-1] < f32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1
    assert max(abs(a - b) for a, b in zip(f32, bf16)) <= 0.05
    assert abs(bf16[-1] - f32[-1]) <= 0.02 * f32[-1]
    assert f32 != bf16  # autocast did run: bf16 products round differently
