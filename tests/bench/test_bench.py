"""The cost benchmark's smoke run: tiny sizes, one repeat; the schema and that every backend ran
(no timing assertions: speed lives in benchmarks/ and docs/benchmarks.md)."""

import json
from pathlib import Path

import pytest

from retnet.cli import main

REFERENCES = {"retnet-reference", "retnet-bfloat16-reference", "retnet-int8-reference"}
BACKENDS = {"retnet", "retnet-bfloat16", "retnet-int8", "llama-dynamic", "llama-static",
            "yet-another-retnet"} | REFERENCES


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One `retnet bench --quick` run (every phase, the reference cells included), whose
    torchscale worker is the stand-in STUB under another interpreter: (out folder, results)."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out / "out"),
                 "--torchscale-python", str(stub_python(out))]) == 0
    return out / "out", json.loads((out / "out" / "results.json").read_text())


@pytest.mark.slow
def test_quick_bench_writes_results_report_and_plots(quick_bench):
    from retnet.bench.report import derived

    tmp_path, results = quick_bench
    meta = results["meta"]
    for key in ("cpu", "cores", "threads", "versions", "bench_config", "retnet_config",
                "backends", "skipped", "dtype"):
        assert key in meta
    assert set(meta["backends"]) == BACKENDS | {"torchscale"}
    limits = results["limits"]  # the better of the start's and the end's measurements
    assert limits["matmul_flops"] == max(limits["start"]["matmul_flops"],
                                         limits["end"]["matmul_flops"]) > 0
    assert results["limits"]["copy_bytes_per_s"] > 0
    for cell in results["decode"]:
        assert {"batch", "context"} <= set(cell)
        for name in BACKENDS:
            r = cell["results"][name]
            assert r["status"] == "ok" and len(r["raw_s"]) == 1 and r["median_s"] > 0
    assert {"retnet", "retnet-bfloat16", "llama-dynamic", "yet-another-retnet"} <= set(
        results["prefill"][0]["results"])
    scaling = results["prefill_scaling"]  # ours at --scaling-batch, each length timed
    assert [(c["batch"], c["T"]) for c in scaling] == [(2, 64), (2, 256)]
    assert all(c["results"]["retnet"]["median_s"] > 0 for c in scaling)
    growth = derived(results)["prefill_scaling_batch_2"]
    assert growth["linear"] == 4 and growth["growth"] == pytest.approx(
        scaling[1]["results"]["retnet"]["median_s"] / scaling[0]["results"]["retnet"]["median_s"])
    train = results["train"][0]["results"]
    assert {"retnet-parallel", "retnet-chunkwise", "llama-sdpa", "retnet-chunkwise-bf16",
            "llama-sdpa-bf16", "yet-another-retnet-parallel"} <= set(train)
    assert all(r["tokens_per_s"] > 0 for r in train.values())

    figures = derived(results)[f"train_{results['train'][0]['T']}"]
    # each against the peak of its dtype; without bf16 dot products the bf16 peak (a 512³
    # product at ~1 GFLOP/s) is below what the tiny model's small bf16 products reach
    bf16_peak_real = results["meta"]["bf16_dot_products"]
    for name in ("retnet-chunkwise", "llama-sdpa", "retnet-chunkwise-bf16", "llama-sdpa-bf16"):
        bound = 1.5 if bf16_peak_real or not name.endswith("bf16") else float("inf")
        assert 0 < figures[f"{name}_mfu"] < bound, name
    assert figures["retnet-chunkwise-bf16_vs_llama"] == pytest.approx(
        train["retnet-chunkwise-bf16"]["tokens_per_s"] / train["llama-sdpa-bf16"]["tokens_per_s"])
    assert results["limits"]["matmul_flops_bf16"] > 0 and results["limits"]["matmul_n_bf16"]
    report = (tmp_path / "report.md").read_text()
    assert "## Decode" in report and "## Training" in report and "torchscale" in report

    # each fast cell beside the same model with every fast path off (issue #33)
    for name in REFERENCES:
        assert meta["backends"][name]["config"]["decode_path"].startswith("PyTorch reference")
    assert "retnet-reference" in results["prefill"][0]["results"]
    assert train["retnet-chunkwise-reference"]["tokens_per_s"] > 0
    assert not any(k.startswith("retnet-reference@") for c in results["flatness"]
                   for k in c["results"])
    ratios = results["fast_vs_reference"]
    assert len(ratios["cells"]) == 3 * len(results["decode"]) + 2  # + prefill, train
    assert ratios["worst"]["ratio"] == max(r["ratio"] for r in ratios["cells"])
    cell = results["decode"][0]["results"]
    assert ratios["cells"][0]["ratio"] == pytest.approx(
        cell["retnet"]["median_s"] / cell["retnet-reference"]["median_s"])
    assert "## Fast paths against the reference" in report
    assert "| train retnet-chunkwise, T 64, batch 4 |" in report
    assert (tmp_path / "decode.png").stat().st_size > 1000
    assert (tmp_path / "memory.png").stat().st_size > 1000


@pytest.mark.slow
def test_only_decode_runs_just_its_cells_with_a_floor_per_format(tmp_path):
    from retnet.bench.report import derived

    assert main(["bench", "--quick", "--only", "decode", "--no-reference",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["decode"] and results["prefill"] == [] and results["train"] == []
    assert not REFERENCES & set(results["meta"]["backends"])  # --no-reference
    assert results["meta"]["skipped"]["torchscale"].startswith("not run")  # no interpreter
    assert results["fast_vs_reference"] == {"cells": [], "worst": None}
    sizes = {n: results["meta"]["backends"][n]["weight_bytes"]
             for n in ("retnet", "retnet-bfloat16", "retnet-int8")}
    assert sizes["retnet-int8"] < sizes["retnet-bfloat16"] < sizes["retnet"]
    d = derived(results)
    floors = [d[f"decode_batch_1{s}"]["floor_ms"] for s in ("", "_bfloat16", "_int8")]
    assert floors[0] > floors[1] > floors[2] > 0
    assert all(d[f"decode_batch_1{s}"]["over_floor"] > 0 for s in ("", "_bfloat16", "_int8"))
    # the compute floor: 2 FLOPs per weight of every product, 4 per state element, per row
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_dict(results["meta"]["retnet_config"])
    weights = results["meta"]["backends"]["retnet"]["non_embedding"] + (
        config.vocab_size * config.d_model)
    flops = 2 * weights + config.state_bytes_per_sequence
    compute = d["decode_batch_1"]["compute_floor_ms"]
    assert compute == pytest.approx(1e3 * flops / results["limits"]["matmul_flops"])
    assert d["decode_batch_1"]["over_max_floor"] == pytest.approx(
        d["decode_batch_1"]["retnet_ms"] / max(floors[0], compute))
    # each floor divides by the copy taken beside its own cell's rounds, not the run's first
    cell = next(c for c in results["decode"] if c["batch"] == 1 and c["context"] == 256)
    assert len(cell["copy_rounds_bytes_per_s"]) == 1 and cell["copy_bytes_per_s"] > 0
    state = config.state_bytes_per_sequence
    assert floors[2] == pytest.approx(1e3 * (sizes["retnet-int8"] + 2 * state)
                                      / cell["copy_bytes_per_s"])
    # flatness from the cell that interleaves the shortest and the longest context
    [flat] = [c for c in results["flatness"] if c["batch"] == 1]
    assert flat["contexts"] == [64, 256]
    lo, hi = (flat["results"][f"retnet-int8@{c}"]["median_s"] for c in (64, 256))
    assert d["decode_batch_1_int8"]["flatness"] == pytest.approx(hi / lo)
    report = (tmp_path / "report.md").read_text()
    assert "against the floors" in report and "| int8, 1 |" in report
    assert "against the reference" not in report
    from retnet import kernels

    path = results["meta"]["backends"]["retnet-int8"]["config"]["decode_path"]  # the one used
    assert path.startswith("fused CPU kernel (int8 weights" if kernels.cpu_kernels()
                           else "PyTorch reference (fast paths off")


STUB = '''import json, sys
if sys.argv[1] == "-c":  # the import probe
    sys.exit(0)
assert sys.argv[1] == "-I"  # isolated: bench/profile.py must not shadow the stdlib's
job = json.loads(sys.argv[-1])
ok = {"status": "ok", "median_s": 0.01, "min_s": 0.01, "max_s": 0.01, "raw_s": [0.01]}
print("progress goes to stderr", file=sys.stderr)
print(json.dumps({
    "versions": {"torch": "stub"}, "config": {"decoder_embed_dim": job["d_model"]},
    "non_embedding": 123, "threads": job["threads"],
    "decode": [{"batch": b, "context": c, "result": ok} for b in job["batches"]
               for c in job["contexts"]],
    "prefill": [{"T": t, "result": ok} for t in job["prefill_lengths"]],
    "train": [{"T": t, "batch": 1, "results": {"torchscale-parallel": {**ok,
               "tokens_per_s": 1.0, "peak_mib": 1.0}}} for t in job["train_lengths"]]}))
'''


def stub_python(folder):
    """An "interpreter" that runs STUB with this one."""
    import sys

    stub = folder / "stub.py"
    stub.write_text(STUB)
    python = folder / "python-ts"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {stub} \"$@\"\n")
    python.chmod(0o755)
    return python


@pytest.mark.slow
def test_torchscale_runs_in_a_separate_interpreter_and_is_merged(quick_bench):
    """The torchscale worker runs under another interpreter; a stand-in for it checks that
    its job carries the matched sizes and that every cell it returns lands in the results."""
    out, results = quick_bench
    assert "torchscale" not in results["meta"]["skipped"]
    assert results["meta"]["backends"]["torchscale"]["non_embedding"] == 123
    assert "separate process" in results["meta"]["backends"]["torchscale"]["process"]
    assert all(c["results"]["torchscale"]["status"] == "ok" for c in results["decode"])
    assert all("torchscale" in c["results"] for c in results["prefill"])
    assert all("torchscale-parallel" in c["results"] for c in results["train"])
    assert "| torchscale |" in (out / "report.md").read_text()  # a column of the decode table


def test_bad_torchscale_python_fails_before_the_run(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path),
                 "--torchscale-python", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an executable file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results.json").exists()


def test_limits_keep_the_better_of_the_start_and_the_end():
    from retnet.bench.machine import best_limits

    start = {"matmul_flops": 1e11, "matmul_flops_bf16": 4e11, "copy_bytes_per_s": 3e10,
             "matmul_n": 2048, "matmul_n_bf16": 512, "copy_buffer_bytes": 7}
    end = start | {"matmul_flops": 2e11, "copy_bytes_per_s": 2e10}
    best = best_limits(start, end)
    assert (best["matmul_flops"], best["matmul_flops_bf16"], best["copy_bytes_per_s"]) == (
        2e11, 4e11, 3e10)
    assert best["matmul_n"] == 2048 and best["start"]["matmul_flops"] == 1e11
    assert best["end"]["copy_bytes_per_s"] == 2e10
    # the bf16 peak keeps the n it was measured at
    best = best_limits(start, end | {"matmul_flops_bf16": 5e11, "matmul_n_bf16": 256})
    assert (best["matmul_flops_bf16"], best["matmul_n_bf16"]) == (5e11, 256)
    assert (best["start"]["matmul_n_bf16"], best["end"]["matmul_n_bf16"]) == (512, 256)


def test_bf16_products_shrink_to_fit_their_time_budget():
    """An AVX2 CPU's bf16 2048³ products take minutes: n halves until they fit the budget."""
    from retnet.bench.machine import BF16_PROBE_N, bf16_matmul_n

    assert bf16_matmul_n(2048, rounds=10, budget_s=1e-9) == BF16_PROBE_N
    assert bf16_matmul_n(2048, rounds=10, budget_s=1e9) == 2048


def test_a_cpu_without_bf16_dot_products_keeps_bf16_decode_and_skips_bf16_compute():
    from retnet.bench.backends import build_backends
    from retnet.model import RetNetConfig

    skipped: dict[str, str] = {}
    backends = {b.name: b for b in build_backends(RetNetConfig.from_preset("tiny"), skipped,
                                                  bf16_compute=False)}
    assert backends["retnet-bfloat16"].decode_setup is not None
    assert backends["retnet-bfloat16"].prefill is None and backends["retnet"].prefill
    modes = {m for b in backends.values() for m in b.train_modes}
    assert "chunkwise" in modes and "sdpa" in modes and not any(m.endswith("bf16") for m in modes)
    assert "no bf16 dot products" in skipped["bf16 autocast training"]
    assert "retnet-bfloat16 prefill" in skipped
    # each format followed by its reference: decode in every format, float32 prefill/training
    names = list(backends)
    assert names[:6] == ["retnet", "retnet-reference", "retnet-bfloat16",
                         "retnet-bfloat16-reference", "retnet-int8", "retnet-int8-reference"]
    assert all(backends[n].decode_setup and backends[n].reference for n in REFERENCES)
    assert backends["retnet-int8-reference"].prefill is None
    reference = backends["retnet-reference"]
    assert reference.prefill and reference.train_modes == ("chunkwise",)
    assert reference.train_label("chunkwise") == "retnet-chunkwise-reference"
    none = build_backends(RetNetConfig.from_preset("tiny"), {}, reference=False)
    assert not any(b.reference for b in none)


@pytest.mark.parametrize("name, call", [("retnet-reference", "decode"),
                                        ("retnet-bfloat16-reference", "decode"),
                                        ("retnet-int8-reference", "decode"),
                                        ("retnet-reference", "prefill"),
                                        ("retnet-reference", "train")])
def test_a_reference_cell_runs_with_every_fast_path_off(name, call):
    """Inside the reference's set-up and calls the switch is off (each module's forward sees
    it so, and no torch.ops.retnet kernel runs); after them it is back as it was."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from retnet import kernels
    from retnet.bench.backends import retnet_reference
    from retnet.model import RetNetConfig

    class RetnetOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("retnet."):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    config = RetNetConfig.from_preset("tiny", vocab_size=64)
    dtype, quantization = {"retnet-reference": (torch.float32, None),
                           "retnet-bfloat16-reference": (torch.bfloat16, None),
                           "retnet-int8-reference": (torch.float32, "int8")}[name]
    switch = kernels.enabled()
    b = retnet_reference(config, dtype, quantization)
    assert b.name == name and b.config["decode_path"].startswith("PyTorch reference")
    switched = []  # kernels.enabled() at each module's forward
    hooks = [m.register_forward_pre_hook(lambda *_: switched.append(kernels.enabled()))
             for m in b.model.modules()]
    ids = torch.randint(0, 64, (2, 33))
    with RetnetOps() as ops:
        if call == "decode":
            with torch.no_grad():
                step = b.decode_setup(2, 16)
                assert kernels.enabled() == switch
                step()
        elif call == "prefill":
            b.prefill(ids)
        else:
            b.train_step(ids, "chunkwise")
    for hook in hooks:
        hook.remove()
    assert switched and not any(switched) and ops.seen == []
    assert kernels.enabled() == switch


def test_fast_paths_against_the_reference_pair_each_cell_with_its_reference():
    from retnet.bench.report import _reference_lines, fast_vs_reference

    def ok(median, best):
        return {"status": "ok", "median_s": median, "min_s": best, "max_s": median}

    results = {
        "decode": [{"batch": 1, "context": 512, "results": {
            "retnet": ok(2e-3, 1e-3), "retnet-reference": ok(4e-3, 4e-3),
            "retnet-int8": ok(1e-3, 1e-3), "retnet-int8-reference": {"status": "out of memory"},
            "llama-dynamic": ok(9e-3, 9e-3)}}],
        "prefill": [{"T": 8192, "results": {"retnet": ok(1.2, 1.1),
                                            "retnet-reference": ok(1.0, 1.0)}}],
        "train": [{"T": 2048, "batch": 4, "results": {
            "retnet-parallel": ok(1.0, 1.0), "retnet-chunkwise": ok(3.0, 3.0),
            "retnet-chunkwise-reference": ok(4.0, 2.0)}}]}
    figures = fast_vs_reference(results)
    assert [(r["phase"], r["backend"], r["where"]) for r in figures["cells"]] == [
        ("decode", "retnet", "batch 1, context 512"), ("prefill", "retnet", "T 8192"),
        ("train", "retnet-chunkwise", "T 2048, batch 4")]
    assert [r["ratio"] for r in figures["cells"]] == pytest.approx([0.5, 1.2, 0.75])
    assert [r["ratio_best"] for r in figures["cells"]] == pytest.approx([0.25, 1.1, 1.5])
    assert figures["cells"][1]["fast_ms"] == pytest.approx(1200)
    assert figures["worst"] is figures["cells"][1]
    lines = _reference_lines(results)
    assert "Worst: prefill retnet, T 8192: 1.20 (1.10)." in lines[3]
    assert "| prefill retnet, T 8192 | 1200.00 | 1000.00 | 1.20 (1.10) |" in lines
    assert fast_vs_reference({"decode": [], "prefill": [], "train": []})["worst"] is None
    assert _reference_lines({"decode": []}) == []


def test_a_decode_cell_that_runs_out_of_memory_is_a_recorded_result():
    from retnet.bench.backends import Backend
    from retnet.bench.cost import BenchConfig, bench_decode

    def too_big(batch, context):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    def fine(batch, context):
        return lambda: None

    common = dict(model=None, config={}, non_embedding=0, prefill=None, train_step=None,
                  memory_bytes=lambda b, c: 0)
    backends = [Backend("big", decode_setup=too_big, **common),
                Backend("small", decode_setup=fine, **common)]
    cfg = BenchConfig(contexts=[16], batches=[1], repeats=1)

    class Bar:
        def update(self, n):
            pass

    [cell] = bench_decode(backends, cfg, Bar())
    assert cell["results"]["big"]["status"] == "out of memory"
    assert "can't allocate" in cell["results"]["big"]["error"]
    assert cell["results"]["small"]["status"] == "ok"  # the others still ran


# ---- The helpers every benchmark shares (retnet.bench.measure) --------------------------------

def test_repeat_timed_leaves_the_warm_ups_out_and_summary_keeps_every_timing():
    from retnet.bench.measure import repeat_timed, summary

    calls = []
    times = repeat_timed(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    assert summary([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                        "raw_s": [3.0, 1.0, 2.0]}


def test_percentile_spread_and_table_format_what_they_are_given():
    from retnet.bench.measure import percentile, spread, table

    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0.0, 0.5, 0.99, 1.0)] == [1.0, 3.0, 5.0, 5.0]
    result = {"median_s": 0.002, "min_s": 0.001, "max_s": 0.0035}
    assert spread(result, scale=1e3, digits=1) == "2.0 (1.0–3.5)"
    assert table(("a", "b"), [[1, "x"], [2, ""]]) == ["| a | b |", "|---|---|", "| 1 | x |",
                                                      "| 2 |  |"]


def test_run_script_answers_a_cell_or_runs_the_sweep(capsys):
    from retnet.bench.measure import run_script, script_parser

    parser = script_parser("A test script.", cell=("A", "B"))
    swept = []
    run_script(parser, ["--cell", "x", "7"], lambda a: {"cell": a.cell}, swept.append)
    assert json.loads(capsys.readouterr().out) == {"cell": ["x", "7"]} and not swept
    run_script(parser, ["--preset", "tiny"], lambda a: {}, swept.append)
    assert [(a.preset, a.out, a.cell) for a in swept] == [("tiny", "benchmarks/results", None)]


def test_spawn_cell_returns_the_cells_json_or_why_it_failed():
    from retnet.bench.measure import spawn_cell

    ok = spawn_cell(["-c", "import json; print('noise'); print(json.dumps({'x': 1}))"])
    assert ok == {"status": "ok", "x": 1}
    oom = spawn_cell(["-c", "raise MemoryError('no room')"])
    assert oom == {"status": "out of memory", "error": "MemoryError: no room"}
    failed = spawn_cell(["-c", "raise SystemExit('bad input')"])
    assert failed == {"status": "failed", "error": "bad input"}


CAPPED = '''from pathlib import Path
from retnet.bench.measure import cap_memory
size = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
            if l.startswith("VmSize:")) / 2**20  # GiB of address space in use
del bytearray(2 * 2**30)[:]  # fits before the cap
cap_memory(size + 1)
bytearray(2 * 2**30)
'''


@pytest.mark.slow
def test_cap_memory_turns_a_large_allocation_into_a_memory_error():
    from retnet.bench.measure import spawn_cell

    assert spawn_cell(["-c", CAPPED])["status"] == "out of memory"


def test_write_results_writes_json_and_markdown_and_prints(tmp_path, capsys):
    from retnet.bench.machine import header
    from retnet.bench.measure import write_results

    first = header("float32", "preset tiny")
    assert first.startswith("`python ") and "torch " in first and first.endswith("preset tiny")
    write_results(tmp_path / "out", "x", {"rows": [1]}, [first, "", "| a |"])
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "out" / "x.md").read_text() == f"{first}\n\n| a |\n"
    assert "| a |" in capsys.readouterr().out


# ---- The benchmark scripts (retnet.bench.forms, .decode, ...; thin entry points in benchmarks/)

@pytest.mark.slow
def test_forms_measures_each_form_in_its_own_process(tmp_path):
    from retnet.bench import forms

    forms.main(["--preset", "tiny", "--lengths", "16", "--repeats", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "forms.json").read_text())["rows"]
    assert [(r["mode"], r["T"], r["status"]) for r in rows] == [("parallel", 16, "ok"),
                                                                  ("chunkwise", 16, "ok")]
    assert all(len(r["raw_s"]) == 2 and r["peak_rss_mib"] > 0 for r in rows)
    assert "| chunkwise | 16 |" in (tmp_path / "forms.md").read_text()


@pytest.mark.slow
def test_a_forms_cell_over_its_memory_cap_is_a_recorded_result(tmp_path):
    from retnet.bench import forms

    forms.main(["--preset", "tiny", "--lengths", "16", "--modes", "parallel", "--repeats", "1",
                "--memory-cap-gib", "0.01", "--out", str(tmp_path)])
    [row] = json.loads((tmp_path / "forms.json").read_text())["rows"]
    assert row["status"] == "out of memory"
    assert "| parallel | 16 | out of memory |" in (tmp_path / "forms.md").read_text()


@pytest.mark.slow
def test_decode_cells_report_the_state_size_of_the_config(tmp_path):
    from retnet.bench import decode
    from retnet.model import RetNetConfig

    decode.main(["--preset", "tiny", "--contexts", "16", "--batches", "2", "--steps", "3",
                 "--out", str(tmp_path)])
    [row] = json.loads((tmp_path / "decode.json").read_text())
    state = 2 * RetNetConfig.from_preset("tiny").state_bytes_per_sequence / 2**20
    assert (row["batch"], row["context"], len(row["raw_s"])) == (2, 16, 3)
    assert abs(row["state_mib"] - state) < 1e-9
    assert "batch 2: time ratio 16/16 = 1.000" in (tmp_path / "decode.md").read_text()


def test_profiled_shares_name_the_operators_that_take_the_time():
    import torch

    from retnet.bench.profile import profiled, shares

    a = torch.randn(256, 256)
    events, total = profiled(lambda: a @ a, repeats=3)
    assert total == sum(e.self_cpu_time_total for e in events) > 0
    top = shares(lambda: a @ a, repeats=3, top=3)
    assert top[0][0] == "aten::mm" and 0 < sum(s for _, s in top) <= 1 + 1e-9


def test_a_profiled_decode_step_is_the_next_tokens_logits_every_time():
    """Against a cache-free parallel forward of prompt + greedy token; a second call gives the
    same logits (the step never advances the state it decodes from)."""
    import torch

    from retnet.bench import profile
    from retnet.model import RetNetConfig, RetNetLM

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    step = profile.decode_step(model, ids)
    first, second = step(), step()
    with torch.no_grad():
        token = model(ids, mode="parallel").logits[:, -1].argmax(-1)
        reference = model(torch.cat([ids, token[:, None]], 1), mode="parallel").logits[:, -1]
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("script", ["forms", "decode", "gemv", "gemv_streams", "quality",
                                    "serve_load", "profile_steps", "chunkwise_ab"])
def test_each_benchmark_script_is_an_entry_point_with_help(script, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / f"{script}.py"
    monkeypatch.setattr("sys.argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(path), run_name="__main__")
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_bench_options_carry_their_help_and_parse_lists_as_integers():
    import argparse
    import dataclasses

    from retnet.bench.cost import BenchConfig
    from retnet.options import add_options, given

    assert all(f.metadata["help"] for f in dataclasses.fields(BenchConfig))
    parser = argparse.ArgumentParser()
    add_options(parser, BenchConfig)
    values = given(parser.parse_args(["--contexts", "16", "32", "--batches", "2"]), BenchConfig)
    cfg = BenchConfig(**values)
    assert (cfg.contexts, cfg.batches, cfg.preset) == ([16, 32], [2], "small")


def test_a_quick_run_does_not_write_over_the_committed_results():
    """`retnet bench --quick` from the repository root replaced benchmarks/results/cost (#34)."""
    from retnet.bench.cost import COMMITTED, BenchConfig

    assert BenchConfig().out == COMMITTED
    quick = BenchConfig(quick=True).out
    assert not Path(quick).resolve().is_relative_to(Path(COMMITTED).resolve())
    assert BenchConfig(quick=True, out="elsewhere").out == "elsewhere"


def test_quality_compares_decoded_logits_with_float32():
    """benchmarks/quality.py's figures: zero error, zero KL and full agreement against itself;
    a perturbed step shows in all three; the perplexity is that of the targets."""
    import torch

    from retnet.bench.quality import compare

    torch.manual_seed(0)
    ref, targets = torch.randn(6, 11), torch.randint(0, 11, (6,))
    same = compare(ref, ref, targets)
    assert same["logits_rel_error"] == 0 and abs(same["max_step_kl"]) < 1e-6
    assert same["argmax_agreement"] == 1
    nll = -ref.log_softmax(-1).gather(1, targets[:, None]).mean()
    assert abs(same["decoded_perplexity"] - nll.exp().item()) < 1e-5
    moved = ref.clone()
    moved[2] = -moved[2]  # one step's argmax flips
    other = compare(moved, ref, targets)
    assert other["logits_rel_error"] > 0.1 and other["max_step_kl"] > 0.1
    assert other["argmax_agreement"] == pytest.approx(5 / 6)


def test_torchscale_job_runs_only_the_chosen_phases():
    from retnet.bench.cost import BenchConfig
    from retnet.bench.peers import torchscale_job
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_preset("tiny")
    job = torchscale_job(config, BenchConfig(only=["decode"]), 2, 1 << 30)
    assert job["batches"] and job["prefill_lengths"] == [] and job["train_lengths"] == []
    every = torchscale_job(config, BenchConfig(), 2, 1 << 30)
    assert every["batches"] and every["prefill_lengths"] and every["train_lengths"]


def test_both_models_train_through_the_same_chunked_loss(monkeypatch):
    """Fairness of the training cells: RetNet's and Llama's steps compute their loss through
    the one chunked cross-entropy on their final hidden states (no [B·T, vocab] logits)."""
    import torch

    import retnet.compare.baselines as baselines
    import retnet.model.lm as lm
    from retnet.bench.backends import llama_backends, retnet_backend
    from retnet.model import RetNetConfig

    real, shapes = baselines.linear_cross_entropy, []

    def spy(hidden, weight, targets, **kw):
        shapes.append(tuple(hidden.shape))
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(baselines, "linear_cross_entropy", spy)
    monkeypatch.setattr(lm, "linear_cross_entropy", spy)
    config = RetNetConfig.from_preset("tiny", vocab_size=64)
    ids = torch.randint(0, 64, (2, 9))  # [B, T + 1]
    retnet_backend(config).train_step(ids, "chunkwise")
    llama_backends(config)[0].train_step(ids, "sdpa")
    assert shapes == [(2, 8, config.d_model)] * 2


def test_bf16_training_modes_run_both_models_under_autocast(monkeypatch):
    import torch

    import retnet.compare.baselines as baselines
    import retnet.model.lm as lm
    from retnet.bench.backends import llama_backends, retnet_backend
    from retnet.model import RetNetConfig

    real, seen = baselines.linear_cross_entropy, []

    def spy(hidden, weight, targets, **kw):
        seen.append(torch.is_autocast_enabled("cpu")
                    and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(baselines, "linear_cross_entropy", spy)
    monkeypatch.setattr(lm, "linear_cross_entropy", spy)
    config = RetNetConfig.from_preset("tiny", vocab_size=64)
    ids = torch.randint(0, 64, (2, 9))
    retnet = retnet_backend(config)
    llama = llama_backends(config)[0]
    assert "chunkwise-bf16" in retnet.train_modes and "sdpa-bf16" in llama.train_modes
    retnet.train_step(ids, "chunkwise-bf16")
    llama.train_step(ids, "sdpa-bf16")
    retnet.train_step(ids, "chunkwise")
    assert seen == [True, True, False]
