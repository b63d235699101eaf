"""Document boundaries (`resets`): a packed row computes exactly what each of its documents
computes alone, in every form and fast path, with padding and an incoming state; the model
(positions restart) and the matched Llama (block-diagonal mask) likewise.

The expected values never touch the code under test: each document is cut out of the packed
inputs and run through tests/reference.py's per-token float64 loop (no resets there), the
first document of a row with the row's incoming state (unless a reset stands at token 0), the
others from zero; the model's documents run alone through the model without resets. Gradients
flow back through the cuts to the same leaves, so every gradient (q, k, v, log γ, incoming
state; the model's parameters) is compared too. Tolerances, relative to each tensor's largest
magnitude: 1e-10 for float64 forms, 1e-5 for float32 paths (the chunkwise Function through
the dispatch table, the Triton kernels in the interpreter)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import tiny_model, tokens
from reference import reference_retention
from retnet.compare import CompareConfig, build_models
from retnet.compare.baselines import document_inputs, matched_llama
from retnet.kernels import chunkwise as chunkwise_fn
from retnet.model import RetNetState
from retnet.ops import Form
from retnet.ops.documents import (
    block_causal_mask,
    cu_seqlens_from_resets,
    resets_from_cu_seqlens,
)
from retnet.ops.retention import retention_chunkwise, retention_parallel, retention_recurrent

B, T, H, K, V = 2, 24, 2, 8, 5
# row 0: starts at multiples of 8 (aligned with L = 8), its first document reads the incoming
# state, and the document at 16 starts on a padded token when padded; row 1: a reset at 0
# (the incoming state is dropped), a one-token document (13) and starts no chunk size aligns
STARTS = ([8, 16], [0, 3, 13, 14])


def resets() -> torch.Tensor:
    r = torch.zeros(B, T, dtype=torch.bool)
    for b, starts in enumerate(STARTS):
        r[b, starts] = True
    return r


def inputs(padded: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    log_decay = torch.log(torch.tensor([0.9, 0.6], dtype=torch.float64))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    if padded:  # left padding, padding on a document start, a hole mid-document, a padded tail
        mask[0, :3] = 0
        mask[0, 16:18] = 0
        mask[1, 7:9] = 0
        mask[1, -2:] = 0
    return q, k, v, log_decay, s0, mask


def documents(row: int) -> list[tuple[int, int]]:
    """(start, end) of each document of a row; the first one from token 0."""
    cuts = sorted({0, *STARTS[row], T})
    return list(itertools.pairwise(cuts))


def alone(q, k, v, log_decay, s0, mask):
    """The expected (o, final state): every document of every row run alone (float64)."""
    rows, finals = [], []
    for b in range(B):
        outs, state = [], None
        for start, end in documents(b):
            incoming = s0[b:b + 1] if start == 0 and 0 not in STARTS[b] and s0 is not None else None
            cut = slice(start, end)
            o, state = reference_retention(q[b:b + 1, cut], k[b:b + 1, cut], v[b:b + 1, cut],
                                           log_decay, incoming,
                                           None if mask is None else mask[b:b + 1, cut])
            outs.append(o)
        rows.append(torch.cat(outs, dim=1))
        finals.append(state)
    return torch.cat(rows), torch.cat(finals)


def _function(chunk):
    """The chunkwise autograd Function called directly (float64 too), inputs prepared as the
    Form prepares them."""
    def run(q, k, v, ld, s0, mask, r):
        s0 = q.new_zeros(B, H, K, V) if s0 is None else s0
        return chunkwise_fn.chunkwise_retention(q, k * mask[..., None, None], v, ld, s0, mask,
                                                chunk, r)
    return run


def _triton(chunk):
    from retnet.kernels import triton_retention as tk

    return lambda q, k, v, ld, s0, mask, r: tk.chunkwise_retention(
        q, k, v, ld, s0, mask, chunk_size=chunk, resets=r)


def _triton_recurrent(q, k, v, ld, s0, mask, r):
    from retnet.kernels import triton_retention as tk

    return tk.recurrent_form(Form("recurrent", backend="triton"), q, k, v, ld, s0, mask, r)


# id: (function of (q, k, v, log γ, state, mask, resets), dtype, gradients checked)
FORMS = {
    "parallel": (retention_parallel, torch.float64, True),
    "recurrent": (retention_recurrent, torch.float64, True),
    **{f"chunkwise-L{c}": (lambda *a, c=c: retention_chunkwise(*a, chunk_size=c),
                           torch.float64, True) for c in (8, 5, 32)},
    **{f"function-L{c}": (_function(c), torch.float64, True) for c in (8, 5, 32)},
    # float32 through Form and the dispatch table: the path a training step takes
    **{f"auto-L{c}": (Form("chunkwise", c), torch.float32, True) for c in (8, 5)},
    **{f"triton-L{c}": (_triton(c), torch.float32, True) for c in (8, 5)},
    "triton-recurrent": (_triton_recurrent, torch.float32, False),
}


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} against a scale of {scale:.3g}"


# every form with and without padding and an incoming state; the Triton step kernel (one
# token at a time, slow in the interpreter) in two of the four cases
CASES = [pytest.param(form, padded, state, id=f"{form}-{'padded' if padded else 'dense'}-"
                      f"{'state' if state else 'zero-state'}")
         for form in FORMS for padded in (False, True) for state in (True, False)
         if form != "triton-recurrent" or padded == state]


@pytest.mark.slow
@pytest.mark.parametrize("form,padded,state", CASES)
def test_packed_equals_documents_alone(form, padded, state, monkeypatch):
    fn, dtype, grads = FORMS[form]
    if form.startswith("triton"):
        pytest.importorskip("triton")
    called = []
    if form.startswith("auto"):  # the table must choose the chunkwise Function here
        real = chunkwise_fn.chunkwise_form
        monkeypatch.setattr(chunkwise_fn, "chunkwise_form",
                            lambda *a, **kw: called.append(1) or real(*a, **kw))
    q, k, v, ld, s0, mask = inputs(padded)
    s0 = s0 if state else None
    ref_in = [t if t is None else t.detach().requires_grad_() for t in (q, k, v, ld, s0)]
    got_in = [t if t is None else t.detach().to(dtype).requires_grad_(grads)
              for t in (q, k, v, ld, s0)]
    ref_o, ref_s = alone(*ref_in, mask)
    o, s = fn(*got_in, mask.to(dtype), resets())
    assert not form.startswith("auto") or called, "the chunkwise Function did not run"
    close(o, ref_o, dtype, "output")
    close(s, ref_s, dtype, "final state")
    if not grads:
        return
    g = torch.Generator().manual_seed(1)
    go = torch.randn(ref_o.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(ref_s.shape, generator=g, dtype=torch.float64)
    names = [n for n, t in zip("q k v log_decay state".split(), ref_in) if t is not None]
    want = torch.autograd.grad((ref_o * go).sum() + (ref_s * gs).sum(),
                               [t for t in ref_in if t is not None])
    got = torch.autograd.grad((o * go.to(o.dtype)).sum() + (s * gs.to(s.dtype)).sum(),
                              [t for t in got_in if t is not None])
    for name, a, b in zip(names, got, want):
        close(a, b, dtype, f"d{name}")


def test_cu_seqlens_and_resets_convert_both_ways():
    cu = torch.tensor([0, 3, 13, 14, 24])
    r = resets_from_cu_seqlens(cu)
    assert r.shape == (1, 24) and r[0].nonzero().flatten().tolist() == [3, 13, 14]
    assert cu_seqlens_from_resets(r).tolist() == cu.tolist()
    assert resets_from_cu_seqlens(torch.tensor([0, 5]), length=8).sum() == 0
    with pytest.raises(ValueError, match="never decrease"):
        resets_from_cu_seqlens(torch.tensor([0, 5, 3]))


def test_block_causal_mask_sees_own_document_only():
    m = block_causal_mask(resets())[:, 0]  # [B, T, T]
    assert m[0, 7, 0] and not m[0, 8, 7] and m[0, 9, 8] and not m[0, 8, 9]
    assert m[1, 13, 13] and not m[1, 14, 13] and not m[1, 13, 12]


def test_resets_must_be_bool_of_the_batch_shape():
    q, k, v, ld, s0, mask = inputs(False)
    with pytest.raises(ValueError, match="resets must be bool"):
        retention_parallel(q, k, v, ld, s0, mask, resets().long())


MODEL_FORMS = {"parallel": Form("parallel"), "recurrent": Form("recurrent"),
               "chunkwise-L8": Form("chunkwise", 8), "chunkwise-L5": Form("chunkwise", 5)}


def model_mask(padded: bool) -> torch.Tensor | None:
    return inputs(padded)[-1].bool() if padded else None


def model_alone(model, ids, state, mask, form):
    """Logits [B, T, vocab] and final state of every document run alone through the model
    (no resets), the first one of a row from `state` unless a reset stands at token 0."""
    logits, finals = [], []
    for b in range(B):
        row, out = [], None
        for start, end in documents(b):
            cut = slice(start, end)
            incoming = state.select([b]) if start == 0 and 0 not in STARTS[b] else None
            out = model(ids[b:b + 1, cut], incoming, mode=form,
                        attention_mask=None if mask is None else mask[b:b + 1, cut])
            row.append(out.logits)
        logits.append(torch.cat(row, dim=1))
        finals.append(out.state)
    return torch.cat(logits), RetNetState.cat(finals)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("form", list(MODEL_FORMS))
def test_model_packed_logits_and_state_equal_documents_alone(form, padded):
    model = tiny_model(torch.float64)
    ids, mask = tokens(B, T), model_mask(padded)
    state = model(tokens(B, 5, seed=1)).state  # an incoming state at position 5
    with torch.no_grad():
        packed = model(ids, state, mode=MODEL_FORMS[form], attention_mask=mask, resets=resets())
        logits, final = model_alone(model, ids, state, mask, MODEL_FORMS[form])
    close(packed.logits, logits, torch.float64, "logits")
    assert packed.state.offset.tolist() == final.offset.tolist()
    for got, want in zip(packed.state.kv, final.kv):
        close(got, want, torch.float64, "state")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_model_packed_parameter_gradients_equal_documents_alone(dtype):
    """A training step's view: every parameter's gradient, chunkwise with chunks that cut
    documents, padding and an incoming state; float32 runs the fast paths the table picks."""
    model = tiny_model(dtype).train()
    ids, mask = tokens(B, T), model_mask(True)
    with torch.no_grad():
        state = model(tokens(B, 5, seed=1)).state
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(B, T, model.config.vocab_size, generator=g, dtype=dtype)
    form = Form("chunkwise", 5)
    params = list(model.parameters())
    packed = model(ids, state, mode=form, attention_mask=mask, resets=resets()).logits
    got = torch.autograd.grad((packed * weights).sum(), params)
    logits, _ = model_alone(model, ids, state, mask, form)
    want = torch.autograd.grad((logits * weights).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        close(a, b.double(), dtype, name)


def test_one_token_step_with_a_reset_starts_from_an_empty_state():
    """A reset on a one-token step (the fused decode step where it is built) drops that row's
    state and position; the other row continues."""
    model = tiny_model(torch.float32)
    state = model(tokens(2, 6, seed=1)).state
    token = tokens(2, 1, seed=2)
    with torch.no_grad():
        step = model(token, state, mode="recurrent", resets=torch.tensor([[True], [False]]))
        fresh = model(token[:1], mode="recurrent")
        kept = model(token[1:], state.select([1]), mode="recurrent")
    close(step.logits, torch.cat([fresh.logits, kept.logits]).double(), torch.float32, "logits")
    assert step.state.offset.tolist() == [1, 7]
    assert torch.equal(step.state.kv[0][0], fresh.state.kv[0][0])


def test_llama_packed_logits_equal_documents_alone():
    """The matched Llama reads a packed row through a block-diagonal causal mask and position
    ids that restart, so its logits equal each document's alone (float64, sdpa on CPU)."""
    config = tiny_model().config
    torch.manual_seed(0)
    llama = matched_llama(config).double().eval()
    ids = tokens(B, T)
    with torch.no_grad():
        packed = llama(input_ids=ids, use_cache=False, **document_inputs(resets())).logits
        alone_ = torch.cat([torch.cat([llama(input_ids=ids[b:b + 1, s:e], use_cache=False).logits
                                       for s, e in documents(b)], dim=1) for b in range(B)])
    close(packed, alone_, torch.float64, "logits")


def test_compare_models_read_a_window_as_its_documents():
    """`retnet compare` (boundaries on by default): both models' adapters start a document at
    each <|endoftext|>, so a packed window's logits are its documents' logits alone."""
    separator = 256
    ids = tokens(1, 20)
    ids[0, [6, 13]] = separator
    cuts = [(0, 6), (6, 13), (13, 20)]
    for name, adapter in build_models(CompareConfig(quick=True), 300, 0, separator).items():
        adapter = adapter.double().eval()
        with torch.no_grad():
            packed = adapter(ids)
            alone_ = torch.cat([adapter(ids[:, s:e]) for s, e in cuts], dim=1)
        close(packed, alone_, torch.float64, name)


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "no-document-boundaries"])
def test_train_and_validation_start_a_document_at_each_separator(opt_out, corpus, tmp_path,
                                                                  monkeypatch):
    """`retnet train` passes resets at each <|endoftext|> of its windows to every training and
    validation forward, and none with --no-document-boundaries."""
    from retnet.model import RetNetLM
    from retnet.tokenizer import ByteTokenizer
    from retnet.train import TrainConfig, train

    seen, real = [], RetNetLM.forward

    def spy(self, input_ids, *args, resets=None, **kwargs):
        seen.append((input_ids, resets))
        return real(self, input_ids, *args, resets=resets, **kwargs)

    monkeypatch.setattr(RetNetLM, "forward", spy)
    train(TrainConfig(preset="tiny", data=str(corpus), out=str(tmp_path / "run"), steps=2,
                      batch_size=2, seq_len=16, warmup=1, eval_every=1, eval_batches=1,
                      save_every=2, no_document_boundaries=opt_out))
    assert seen
    for ids, resets in seen:
        assert resets is None if opt_out else torch.equal(resets, ids == ByteTokenizer.eos_id)
