"""The Triton retention kernels (retnet.kernels.triton_retention), run on CPU tensors by
Triton's interpreter, against the float64 PyTorch forms: outputs, final states and every
gradient (q, k, v, log γ, incoming state) with padding, incoming states, chunk sizes that do
and do not divide T, several value blocks, bf16 inputs; the fused step in place; selection
through Form(backend="triton") and its fallbacks; a model trained and decoded through them.

Tolerances: the kernels compute in float32 (IEEE products here: the interpreter has no TF32),
so each result is held to 1e-5 of its largest magnitude against float64."""

import pytest
import torch

import retnet.kernels as kernels
from retnet import RetNetConfig, RetNetLM
from retnet.kernels import triton_retention as tk
from retnet.ops import Form
from retnet.ops.retention import retention_parallel, retention_step

REL = 1e-5


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} against a scale of {scale:.3g}"


def inputs(B, T, H, K, V, *, state=True, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    log_decay = torch.log(torch.linspace(0.97, 0.5, H, dtype=torch.float64))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if state else None
    mask = torch.ones(B, T, dtype=torch.float64)
    if padded:  # left padding in row 0, holes and a padded tail in the last row
        mask[0, :5] = 0
        mask[-1, T // 2:T // 2 + 3] = 0
        mask[-1, -2:] = 0
    return q, k, v, log_decay, s0, mask


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.slow
@pytest.mark.parametrize("shape,chunk", [
    ((2, 48, 2, 8, 9), 16),  # chunks divide T
    ((2, 37, 2, 8, 9), 12),  # a chunk size that is no power of two and leaves a tail
    ((1, 20, 1, 20, 70), 64),  # one chunk longer than T; K past a block, two value blocks
])
@pytest.mark.parametrize("state", [True, False])
def test_chunkwise_forward_and_every_gradient_match_float64(shape, chunk, state):
    q, k, v, ld, s0, mask = inputs(*shape, state=state)
    ref_in = leaves((q, k, v, ld, s0), torch.float64)
    got_in = leaves((q, k, v, ld, s0), torch.float32)
    ref_o, ref_s = retention_parallel(*ref_in, mask)
    o, s = tk.chunkwise_retention(*got_in, mask.float(), chunk_size=chunk)
    assert o.dtype == s.dtype == torch.float32
    close(o, ref_o)
    close(s, ref_s)
    g = torch.Generator().manual_seed(1)
    go, gs = torch.randn(ref_o.shape, generator=g, dtype=torch.float64), torch.randn(
        ref_s.shape, generator=g, dtype=torch.float64)
    wanted = [t for t in ref_in if t is not None]
    ref_grads = torch.autograd.grad((ref_o * go).sum() + (ref_s * gs).sum(), wanted)
    got_grads = torch.autograd.grad((o * go.float()).sum() + (s * gs.float()).sum(),
                                    [t for t in got_in if t is not None])
    for name, got, ref in zip("q k v log_decay state".split(), got_grads, ref_grads):
        assert got.dtype == torch.float32, name
        close(got, ref)


def test_bf16_inputs_compute_in_float32():
    q, k, v, ld, s0, mask = inputs(2, 30, 2, 16, 17)
    q, k, v = (t.bfloat16() for t in (q, k, v))  # the rounded values are the inputs
    ref_o, ref_s = retention_parallel(q.double(), k.double(), v.double(), ld, s0, mask)
    leaves_ = leaves((q, k, v), torch.bfloat16)
    o, s = tk.chunkwise_retention(*leaves_, ld.float(), s0.float(), mask.float(), chunk_size=16)
    close(o, ref_o)
    close(s, ref_s)
    o.sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in leaves_)


def test_step_matches_the_reference_step_in_place():
    g = torch.Generator().manual_seed(2)
    B, H, K, V = 3, 2, 8, 70
    q, k = (torch.randn(B, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, V, generator=g, dtype=torch.float64)
    ld = torch.log(torch.tensor([0.9, 0.6], dtype=torch.float64))
    s = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # row 1 is padding
    ref_o, ref_s = retention_step(q, k, v, ld, s.clone(), mask)
    buf = s.float()
    o, new = tk.retention_step(q.float(), k.float(), v.float(), ld.float(), buf, mask.float(),
                               out=buf)
    assert new.data_ptr() == buf.data_ptr()  # written in place, in the caller's buffer
    close(o, ref_o)
    close(new, ref_s)
    assert torch.equal(new[1], s[1].float())  # a padded row is untouched


def test_form_selects_the_kernels_and_falls_back(monkeypatch, capsys, kernels_on):
    q, k, v, ld, s0, mask = inputs(2, 24, 2, 8, 9)
    triton_form = Form("chunkwise", 8, backend="triton")
    calls = counting(monkeypatch, "chunkwise_retention")
    o, _ = triton_form(q.float(), k.float(), v.float(), ld.float(), s0.float(), mask.float())
    assert calls == [1]
    close(o, retention_parallel(q, k, v, ld, s0, mask)[0])
    # float64 and a disabled switch run the PyTorch form, saying why (once per reason)
    o64, _ = triton_form(q, k, v, ld, s0, mask)
    assert calls == [1] and o64.dtype == torch.float64
    assert "compute in float32" in capsys.readouterr().err
    kernels.set_enabled(False)
    try:
        triton_form(q.float(), k.float(), v.float(), ld.float(), s0.float(), mask.float())
    finally:
        kernels.set_enabled(None)
    assert calls == [1]
    with pytest.raises(ValueError, match="parallel form is PyTorch only"):
        Form("parallel", backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        Form("chunkwise", backend="cuda")


def counting(monkeypatch, name: str) -> list:
    calls, real = [], getattr(tk, name)
    monkeypatch.setattr(tk, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.slow
def test_a_model_trains_and_decodes_through_the_kernels(monkeypatch, kernels_on):
    """Logits and every parameter gradient of a small LM through Form(chunkwise, triton)
    against the float64 parallel form; then recurrent decoding through the step kernel
    against the PyTorch recurrent form, in logits and state."""
    chunks, steps = counting(monkeypatch, "chunkwise_retention"), counting(
        monkeypatch, "retention_step")
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2)
    model64 = RetNetLM(config).double()
    model32 = RetNetLM(config)
    model32.load_state_dict(model64.state_dict())
    ids = torch.randint(0, 61, (2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :4] = 0
    ref = model64(ids, attention_mask=mask, mode="parallel")
    got = model32(ids, attention_mask=mask, mode=Form("chunkwise", 8, backend="triton"))
    close(got.logits, ref.logits)
    (ref.logits.sum() + sum(t.sum() for t in ref.state.kv)).backward()
    (got.logits.sum() + sum(t.sum() for t in got.state.kv)).backward()
    for p32, p64 in zip(model32.parameters(), model64.parameters()):
        if p64.grad is not None and p64.grad.abs().max() > 0:
            close(p32.grad, p64.grad, 2e-5)
    with torch.no_grad():
        state = ref.state
        ref_steps, got_steps = [], []
        ref_state, got_state = state, float32_state(state)
        for t in ids[:, :5].T:
            r = model64(t[:, None], state=ref_state, mode="recurrent")
            g = model32(t[:, None], state=got_state, mode=Form("recurrent", backend="triton"))
            ref_steps.append(r.logits)
            got_steps.append(g.logits)
            ref_state, got_state = r.state, g.state
        close(torch.cat(got_steps, 1), torch.cat(ref_steps, 1))
        assert len(chunks) == config.n_layers and len(steps) == 5 * config.n_layers
        for a, b in zip(got_state.kv, ref_state.kv):
            close(a, b)


def float32_state(state):
    return state._replace(kv=tuple(t.detach().float() for t in state.kv))
