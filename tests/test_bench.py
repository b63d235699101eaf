"""The cost benchmark's smoke run: tiny sizes, one repeat; the schema and that every backend ran
(no timing assertions: speed lives in benchmarks/ and docs/benchmarks.md)."""

import json

from retnet.cli import main

BACKENDS = {"retnet", "retnet-bfloat16", "llama-dynamic", "llama-static", "yet-another-retnet"}


def test_quick_bench_writes_results_report_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    meta = results["meta"]
    for key in ("cpu", "cores", "threads", "versions", "bench_config", "retnet_config",
                "backends", "skipped", "dtype"):
        assert key in meta
    assert set(meta["backends"]) == BACKENDS
    assert results["limits"]["matmul_flops"] > 0 and results["limits"]["copy_bytes_per_s"] > 0
    for cell in results["decode"]:
        assert {"batch", "context"} <= set(cell)
        for name in BACKENDS:
            r = cell["results"][name]
            assert r["status"] == "ok" and len(r["raw_s"]) == 1 and r["median_s"] > 0
    assert {"retnet", "retnet-bfloat16", "llama-dynamic", "yet-another-retnet"} <= set(
        results["prefill"][0]["results"])
    train = results["train"][0]["results"]
    assert {"retnet-parallel", "retnet-chunkwise", "llama-sdpa",
            "yet-another-retnet-parallel"} <= set(train)
    assert all(r["tokens_per_s"] > 0 for r in train.values())
    report = (tmp_path / "report.md").read_text()
    assert "## Decode" in report and "## Training" in report and "torchscale" in report
    assert (tmp_path / "decode.png").stat().st_size > 1000
    assert (tmp_path / "memory.png").stat().st_size > 1000


STUB = '''import json, sys
if sys.argv[1] == "-c":  # the import probe
    sys.exit(0)
job = json.loads(sys.argv[2])
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


def test_torchscale_runs_in_a_separate_interpreter_and_is_merged(tmp_path):
    """The torchscale worker runs under another interpreter; a stand-in for it checks that
    its job carries the matched sizes and that every cell it returns lands in the results."""
    import sys

    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    python = tmp_path / "python-ts"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {stub} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--out", str(out), "--torchscale-python", str(python)]) == 0
    results = json.loads((out / "results.json").read_text())
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
