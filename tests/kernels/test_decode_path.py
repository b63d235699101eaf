"""The lean decode path: the one-token retention step with an output buffer, the multi-core
GEMV in `retnet.ops.linear`, the transposed weight layout, and `state_out` in the model."""

import pytest
import torch
import torch.nn.functional as F

from helpers import FORMS, tiny_model, tokens
from reference import reference_retention, rel_err
from retnet.checkpoint import load_checkpoint, save_checkpoint
from retnet.generation import decode_one, generate, prefill
from retnet.modules.layout import set_weight_layout, use_decode_layout, weight_layout
from retnet.ops import log_decays
from retnet.ops.linear import linear
from retnet.ops.retention import retention_step
from retnet.tokenizer import ByteTokenizer


@pytest.fixture
def two_threads():
    """The split GEMV path needs ≥ 2 threads; CI has 2 cores, but pin it so the test is real."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_retention_step_into_a_buffer_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    B, H, K, V = 3, 2, 4, 5
    q, k = torch.randn(2, B, 1, H, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, 1, H, V, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)  # row 1 is padding
    log_decay = log_decays(H, dtype=torch.float64)
    o_ref, s_ref = reference_retention(q, k, v, log_decay, state, mask)
    before = state.clone()
    out = torch.full_like(state, float("nan"))
    o, new = retention_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state, mask[:, 0], out=out)
    assert new.data_ptr() == out.data_ptr()  # written into the buffer, not a new tensor
    assert torch.equal(state, before)  # the input state is untouched
    assert rel_err(o, o_ref[:, 0]) < 1e-12 and rel_err(new, s_ref) < 1e-12
    assert torch.equal(new[1], state[1])  # a padded row neither decays nor writes


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("layout", ["default", "decode"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (7, 5)], ids=["wide", "tall", "odd"])
def test_linear_equals_the_float64_product(shape, layout, rows, two_threads):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=g)
    if layout == "decode":
        weight = weight.t().contiguous().t()
    x = torch.randn(rows, 1, shape[1], generator=g)
    ref = F.linear(x.double(), weight.double())
    out = linear(x, weight)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6


def test_weight_layout_changes_storage_not_values_or_parameters():
    model = tiny_model()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    use_decode_layout(model)
    assert weight_layout(model) == "decode"
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1])
        if p.dim() == 2:
            assert p.stride()[0] == 1  # [out, in] stored as [in, out]
    # q, k, v, g side by side in one buffer: one product per token
    fused = model.blocks[0].retention.fused_input()
    att = model.blocks[0].retention
    assert fused is not None and torch.equal(fused, torch.cat(
        [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.g_proj.weight]))
    assert model.output_weight is model.embed.weight  # still tied
    set_weight_layout(model, "default")
    assert weight_layout(model) == "default"
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.blocks[0].retention.fused_input() is None
    with pytest.raises(ValueError, match="unknown weight layout 'fast'"):
        set_weight_layout(model, "fast")


@pytest.mark.parametrize("form", FORMS, ids=[f"{m}{c}" for m, c in FORMS])
def test_decode_layout_gives_the_same_logits_in_every_form(form, two_threads):
    model, fast = tiny_model(), use_decode_layout(tiny_model())
    x = tokens(2, 40)
    a, b = model(x, mode=form[0], chunk_size=form[1]), fast(x, mode=form[0], chunk_size=form[1])
    assert rel_err(b.logits, a.logits) < 1e-5
    step_a, step_b = decode_one(model, x[:, -1], a.state), decode_one(fast, x[:, -1], b.state)
    assert rel_err(step_b[0], step_a[0]) < 1e-5
    for kv_a, kv_b in zip(step_a[1].kv, step_b[1].kv):
        assert rel_err(kv_b, kv_a) < 1e-5


def test_decode_layout_trains_and_saves_like_the_default(tmp_path, two_threads):
    model = use_decode_layout(tiny_model(vocab_size=258))
    x = tokens(2, 17)
    loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    path = save_checkpoint(tmp_path, 1, model.state_dict(), model.config, ByteTokenizer(), {},
                           {})
    loaded = load_checkpoint(path).build_model()
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


def test_state_out_receives_the_new_state_and_leaves_the_input_alone():
    model = tiny_model(torch.float64)
    x = tokens(3, 12)
    _, state = prefill(model, x)
    before = state.clone()
    token = tokens(3, 1, seed=5)[:, 0]
    active = torch.tensor([True, False, True])
    ref_logits, ref_state = decode_one(model, token, state, active)
    out = state.empty_like()
    logits, new = decode_one(model, token, state, active, out=out)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(new.kv, out.kv))
    assert rel_err(logits, ref_logits) < 1e-12
    for a, b, c in zip(new.kv, ref_state.kv, before.kv):
        assert rel_err(a, b) < 1e-12
        assert torch.equal(a[1], c[1])  # the inactive row is carried over unchanged
    assert torch.equal(new.offset, torch.tensor([13, 12, 13]))
    for a, b in zip(state.kv, before.kv):
        assert torch.equal(a, b)


def test_state_out_misuse_is_refused():
    model = tiny_model()
    x = tokens(2, 5)
    _, state = prefill(model, x)
    with pytest.raises(ValueError, match="must not share|sharing no buffer"):
        decode_one(model, x[:, 0], state, out=state)
    with pytest.raises(ValueError, match="contiguous state of the input state's shape"):
        decode_one(model, x[:, 0], state, out=state.select([0]).empty_like())
    with pytest.raises(ValueError, match="mode='recurrent'"):
        with torch.no_grad():
            model.step(x, state, state.empty_like(), mode="chunkwise")


def test_generate_with_alternating_buffers_equals_fresh_states(two_threads):
    """generate() reuses two state buffers; the tokens and final state equal a loop that
    allocates a new state per step, in both weight layouts."""
    model = tiny_model(torch.float64)
    prompt = tokens(2, 9)
    out, state = generate(model, prompt, 20, return_state=True)
    logits, ref = prefill(model, prompt)
    expected = []
    for _ in range(20):
        token = logits.argmax(-1)
        expected.append(token)
        logits, ref = decode_one(model, token, ref)
    assert torch.equal(out[:, 9:], torch.stack(expected, 1))
    for a, b in zip(state.kv, ref.kv):
        assert rel_err(a, b) < 1e-12
    fast = use_decode_layout(tiny_model())
    slow = tiny_model()
    a, b = generate(fast, prompt, 20), generate(slow, prompt, 20)
    assert torch.equal(a, b)
