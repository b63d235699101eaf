"""The dispatch table (`retnet.kernels.dispatch`), the one place that decides which code runs:
every row names real code and every fast path needs the switch; with the switch off, a model's
forward in every form, a training step with its backward and generation run no fast path at all
(counted by wrapping each fast path's function, and seen from outside: no `retnet::` op in the
profiler, no custom autograd Function in the backward graph); with it on, each fast path runs
where its conditions hold; `retnet info --kernels` says which and why."""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter

import pytest
import torch

from retnet import kernels
from retnet.generation import generate
from retnet.info import KERNEL_CASES
from retnet.kernels import dispatch
from retnet.model import RetNetConfig, RetNetLM, use_inference_layout
from retnet.modules.layout import weight_layout
from retnet.ops import Form

FAST = [fast for row in dispatch.TABLE.values() for fast in row.fast]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _resolve(path: str):
    module, qualname = path.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_row_names_real_code_and_every_fast_path_needs_the_switch():
    for op, row in dispatch.TABLE.items():
        assert callable(_resolve(row.reference)), op
        for fast in row.fast:
            if fast.impl.startswith("triton_retention:") and not HAS_TRITON:
                continue
            assert callable(fast.function()), fast.impl
            assert dispatch.SWITCH in fast.needs, f"{op}: {fast.name} ignores the switch"


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Every fast path's function wrapped where the table finds it (its module), counting
    calls by its "module:function" name; a call that bypassed the table is counted too."""
    counted: Counter = Counter()
    for fast in FAST:
        if fast.impl.startswith("triton_retention:") and not HAS_TRITON:
            continue
        module, name = fast.impl.split(":")
        owner = importlib.import_module(f"retnet.kernels.{module}")
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _key=fast.impl, **kwargs):
            counted[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return counted


def _graph_names(t: torch.Tensor) -> set[str]:
    """The names of every node in t's backward graph."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo += [n for n, _ in node.next_functions]
    return names


def _workload(**overrides) -> tuple[set[str], str]:
    """A tiny model through everything a user does: a training step with backward (chunkwise
    form with the loss, and the parallel form), every form without grad, one-token steps,
    generation of one row and of two; returns the backward graphs' node names and the layout
    `use_inference_layout` chose."""
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=61, **overrides))
    ids = torch.randint(0, 61, (2, 9))
    names: set[str] = set()
    for form in (Form("chunkwise", 4), Form("parallel")):
        loss = model(ids, mode=form, targets=ids).loss
        names |= _graph_names(loss)
        loss.backward()
    model.eval()
    with torch.no_grad():
        for mode in ("parallel", "chunkwise", "recurrent"):
            state = model(ids, mode=mode, chunk_size=4).state
        model(ids[:, :1], state=state, mode="recurrent")
        if HAS_TRITON:  # asked for by name: still off with the switch
            model(ids, mode=Form("chunkwise", 4, backend="triton"))
    layout = weight_layout(use_inference_layout(model))
    generate(model, ids[:1], 3)
    generate(model, ids, 3)
    return names, layout


def _run(fast: bool, **overrides) -> tuple[set[str], str, set[str], bool]:
    """The workload with the switch as given: graph node names, layout, the profiler's op
    names, and whether the C++ kernels were loaded."""
    kernels.set_enabled(fast)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            names, layout = _workload(**overrides)
        compiled = kernels.cpu_kernels()
    finally:
        kernels.set_enabled(None)
    return names, layout, {e.name for e in prof.events()}, compiled


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"head_norm": "rms"}], ids=["paper", "rms-heads"])
def test_the_switch_off_runs_no_fast_path(calls, overrides):
    names, layout, ops, _ = _run(False, **overrides)
    assert not calls, f"fast paths ran with the switch off: {dict(calls)}"
    assert not {n for n in ops if n.startswith("retnet::")}  # no compiled op either
    # autograd's own nodes are named like "MmBackward0" (or torch::autograd::AccumulateGrad);
    # a custom Function's "NameBackward"
    custom = {n for n in names if not n[-1].isdigit() and not n.startswith("torch::autograd::")}
    assert not custom, sorted(custom)
    assert layout == "default"  # the transposed layout serves the split GEMV only


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"head_norm": "rms"}], ids=["paper", "rms-heads"])
def test_the_switch_on_takes_each_fast_path_where_it_holds(calls, overrides):
    names, layout, ops, compiled = _run(True, **overrides)
    want = {"chunkwise:chunkwise_form", "norm_linear:layer_norm_linear",
            "activation:act_linear", "loss:chunked_cross_entropy", "gemv:split_linear"}
    if compiled:
        want |= {"decode:fused_decode"}
    # the fused output stage takes the gate (GroupNorm heads, float32, the kernels built)
    want |= ({"head_norm:head_norm_gate"} if compiled and not overrides else {"gate:silu_gate"})
    if HAS_TRITON:  # conftest runs Triton in its interpreter: the named backend runs
        want |= {"triton_retention:chunkwise_form"}
    assert set(calls) == want
    assert {"ChunkwiseRetentionBackward", "_LinearCrossEntropyBackward"} <= names
    assert ("retnet::decode_step" in ops) == compiled
    assert layout == ("default" if compiled else "decode")


def test_explain_says_which_path_and_why(monkeypatch):
    call = dispatch.Call("cpu", torch.float64, grad=True)
    kernels.set_enabled(True)
    try:
        assert dispatch.explain("retention.chunkwise", call) == (
            "reference (chunkwise autograd Function: float64 tensors: it can only compute in "
            "float32)")
        assert dispatch.explain("retention.parallel", call) == "reference (no fast path)"
        assert dispatch.explain("silu_gate", call) == "recomputing autograd Function"
        one_row = dispatch.Call("cpu", torch.float32, rows=1)
        assert dispatch.explain("linear", one_row) == "split GEMV across cores"
        kernels.set_enabled(False)
        assert dispatch.explain("linear", one_row) == (
            "reference (fast paths off: set_enabled(False))")
        kernels.set_enabled(None)
        monkeypatch.setenv(kernels.ENV, "0")
        assert dispatch.explain("silu_gate", call) == "reference (fast paths off: RETNET_KERNELS=0)"
    finally:
        kernels.set_enabled(None)


def test_info_kernels_prints_each_operation(capsys, monkeypatch):
    from retnet.cli import main

    monkeypatch.setenv(kernels.ENV, "1")
    assert main(["info", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fast paths: on")
    assert len(lines) == 1 + len(KERNEL_CASES)
    if kernels.cpu_kernels():
        step = next(line for line in lines if line.startswith("decode step (float32): "))
        assert step.startswith("decode step (float32): fused CPU kernel [")
    monkeypatch.setenv(kernels.ENV, "0")
    assert main(["info", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fast paths: off (RETNET_KERNELS=0); C++ kernels: not tried"
    assert "head-norm+gate (float32): reference (fast paths off: RETNET_KERNELS=0)" in lines
    assert all("reference" in line for line in lines[1:])


def test_the_old_backend_name_still_works_with_a_warning():
    """backend="torch" meant the fast chunkwise path, not the PyTorch reference: it is "auto"
    now, the old name kept for a while."""
    with pytest.warns(DeprecationWarning, match="backend='auto'"):
        form = Form("chunkwise", 8, backend="torch")
    assert form == Form("chunkwise", 8) and form.backend == "auto"
