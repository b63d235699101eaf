"""The fused CPU decode step (`retnet.kernels.decode`) against the float64 whole-model
reference (tests/reference_lm.py), for every architecture variant, padded rows included, with
the fast path on and off; and generation with it against generation without it."""

from __future__ import annotations

import pytest
import torch

from recall import recall_model
from reference_lm import reference_forward
from retnet import kernels
from retnet.generation import StepBuffers, prefill
from retnet.kernels.decode import fused_decode
from retnet.kernels.dispatch import choose
from retnet.model import RetNetConfig, RetNetLM, RetNetOutput, RetNetState
from retnet.model.fast_decode import decode_path
from retnet.modules.layout import set_weight_layout
from retnet.modules.quant import quantize

LOGITS_TOL, STATE_TOL = 1e-5, 1e-6  # relative, float32 against float64
VARIANTS = {
    "paper": {},
    "torchscale": dict(norm="rms", head_norm="rms", ffn="glu-gelu", decays="eq8",
                       scale_embeddings=False),
    "untied-swish": dict(tie_embeddings=False, ffn="glu-swish", decays="single"),
    "ablations": dict(head_norm="none", use_gate=False, decays="none"),
    "values": dict(value_dim=96, ffn_dim=80, n_heads=4, decays="multiscale"),
    # 512 key rows per head: the state pass's four-row streams (rows of 73 values, not a
    # multiple of 16) and the rows left over
    "wide-keys": dict(d_model=512, n_heads=1, value_dim=72, ffn_dim=64, n_layers=1),
}


def fused_step(model, ids, state, mask, out) -> RetNetOutput | None:
    """A one-token step of ids [B, 1] through the fast path the dispatch table chooses, as
    `RetNetLM.forward` takes it; None where none runs."""
    args = (model, ids[:, 0], state, None if mask is None else mask[:, 0], out)
    fast = choose("decode_step", *args)
    step = None if fast is None else fast(*args)
    return None if step is None else RetNetOutput(step[0].unsqueeze(1), step[1])


def _model(dtype: torch.dtype, **overrides) -> RetNetLM:
    """A tiny model whose weights are far from their init, so norms, gates and the state all
    move the logits."""
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=97, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if dtype == torch.int8:
        return quantize(model.eval(), "int8")
    return model.to(dtype).eval()


def _float64_weights(model: RetNetLM) -> dict[str, torch.Tensor]:
    """The weights the model stands for, in float64: bf16 exactly, int8 rows times scales."""
    sd = model.state_dict()
    out = {}
    for name, w in sd.items():
        if name.endswith(".scales"):
            continue
        scales = sd.get(name.removesuffix("weight") + "scales")
        out[name] = w.double() if scales is None else w.double() * scales.double()[:, None]
    return out


def _state(model: RetNetLM) -> RetNetState:
    """A large incoming state at distinct positions, for three rows."""
    g = torch.Generator().manual_seed(1)
    state = model.init_state(3)
    kv = tuple(torch.randn(t.shape, generator=g) for t in state.kv)
    return RetNetState(kv, torch.tensor([7, 0, 3000]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8],
                         ids=["f32", "bf16", "int8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_matches_float64_reference(fast, variant, dtype):
    model = _model(dtype, **VARIANTS[variant])
    state, ids = _state(model), torch.tensor([[5], [90], [33]])
    mask = torch.tensor([[1], [1], [0]])  # the last row is padding: nothing may change
    before = state.clone()
    out_buffers = state.empty_like()
    with torch.no_grad():
        out = model.step(ids, state, out_buffers, attention_mask=mask)
        used = fused_step(model, ids, state, mask, state.empty_like()) is not None
    assert used == fast  # on this machine the kernel builds, so "kernel" really ran it
    weights = _float64_weights(model)
    logits, (kv, offset) = reference_forward(model.config.to_dict(), weights, ids, mask,
                                             before)
    # bf16 weights: the fused step computes in float32 (its state is exact to float32, its
    # logits are rounded to the model's bf16 on return); the PyTorch path computes in bf16.
    bf16 = dtype == torch.bfloat16
    logits_tol = 1e-2 if bf16 else LOGITS_TOL
    state_tol = 2e-2 if bf16 and not fast else STATE_TOL
    assert _rel(out.logits[:2].float(), logits[:2]) < logits_tol
    for got, want in zip(out.state.kv, kv):
        assert _rel(got, want) < state_tol
    assert out.state.offset.tolist() == offset.tolist() == [8, 1, 3000]
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(out.state.kv, out_buffers.kv))
    assert all(torch.equal(a, b) for a, b in zip(state.kv, before.kv))  # input untouched


def test_bf16_logits_before_rounding(fast):
    """The fused step's float32 logits of bf16 weights match float64 on the same weights
    (the model rounds its returned logits to bf16, as the reference path does)."""
    model = _model(torch.bfloat16)
    state, ids = _state(model), torch.tensor([[5], [90], [33]])
    weights = _float64_weights(model)
    logits, _ = reference_forward(model.config.to_dict(), weights, ids, None, state)
    with torch.no_grad():
        out = fused_step(model, ids, state, None, None)
    if fast:
        assert out is not None and out.logits.dtype == torch.bfloat16
        assert _rel(out.logits.float(), logits) < 8e-3  # bf16 rounding of the logits only
    else:
        assert out is None


def test_teacher_forced_generation_equals_reference():
    """The trained copy model decodes a history-dependent text: per-step logits with the fused
    step equal those of the PyTorch path."""
    model = recall_model(torch.float32)
    text = b"hello|hello\nretentive|retentive\nnetwork|network\n"
    ids = torch.tensor([list(text)])
    runs = []
    for on in (True, False):
        kernels.set_enabled(on)
        logits, state = prefill(model, ids[:, :8])
        steps, buffers = [logits], StepBuffers()
        for t in range(8, ids.shape[1]):
            logits, state = buffers.step(model, ids[:, t], state)
            steps.append(logits)
        runs.append(torch.stack(steps))
    kernels.set_enabled(None)
    assert _rel(runs[0], runs[1]) < LOGITS_TOL
    # the copy is predicted from the state: the model is sure of the second "retentive"
    assert runs[0][-12].softmax(-1).max() > 0.5


def test_decode_path_says_which_code_runs(kernels_on):
    model = _model(torch.float32)
    assert decode_path(model).startswith("fused CPU kernel (float32 weights")
    kernels.set_enabled(False)
    try:
        assert "fast paths off" in decode_path(model)
    finally:
        kernels.set_enabled(True)
    assert "float64 weights have no fused kernel" in decode_path(model.double())
    set_weight_layout(model.float(), "decode")  # transposed rows: the kernel declines
    assert "layout" in decode_path(model)
    with torch.no_grad():
        assert fused_step(model, torch.tensor([[1]]), model.init_state(1), None, None) is None
        set_weight_layout(model, "default")
        assert fused_step(model, torch.tensor([[1]]), model.init_state(1), None, None)


def test_cached_plan_follows_the_weights(kernels_on):
    """The kernel's cached arguments follow re-stores (`.to`), in-place writes (an optimiser
    step, `load_state_dict`; bf16 norm vectors are float32 copies in the plan) and
    quantisation: after each, the fused step equals the PyTorch path on the new weights."""
    model = _model(torch.float32)
    state, ids = _state(model), torch.tensor([[5], [90], [33]])

    def check(tol: float):
        with torch.no_grad():
            fused = fused_step(model, ids, state, None, None)
            kernels.set_enabled(False)
            try:
                want = model(ids, state=state, mode="recurrent").logits
            finally:
                kernels.set_enabled(True)
        assert fused is not None and _rel(fused.logits.float(), want.float()) < tol

    check(LOGITS_TOL)
    model.to(torch.bfloat16)  # new tensors: the cached plan's are the float32 ones
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    check(2e-2)
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(-2.0)  # a bf16 vector: the plan holds a copy
    check(2e-2)
    model.load_state_dict(_model(torch.bfloat16, decays="multiscale").state_dict())
    check(2e-2)
    quantize(model.float(), "int8")
    check(LOGITS_TOL)


def test_fused_decode_refuses_state_buffers_it_cannot_hold(kernels_on):
    """The kernel writes the new state through raw pointers: buffers of another shape, dtype
    or layout are refused with a one-line error (or left to `forward`, which says what is
    wrong), never read or written out of bounds."""
    assert kernels.cpu_kernels()  # called directly: the table would have loaded them
    model = _model(torch.float32)
    state = _state(model)
    token = torch.tensor([5, 90, 33])
    with torch.no_grad():
        good = fused_decode(model, token, state, None, state.empty_like())
        assert good is not None
        short = state.empty_like()
        short = RetNetState((*short.kv[:-1], short.kv[-1][:, :, :-1].contiguous()), short.offset)
        with pytest.raises(RuntimeError, match="state must be distinct contiguous float32"):
            fused_decode(model, token, state, None, short)
        shared = RetNetState((state.kv[0], *state.empty_like().kv[1:]), state.offset.clone())
        with pytest.raises(RuntimeError, match="distinct"):
            fused_decode(model, token, state, None, shared)
        other_batch = state.select([0]).empty_like()  # forward's check names the problem
        assert fused_decode(model, token, state, None, other_batch) is None
