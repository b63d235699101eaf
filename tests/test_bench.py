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
