"""benchmarks/gpu.py's plumbing on the CPU (--quick --device cpu): every section written, every
cell numbers or a status string, a failing cell recorded and the run going on, the budget.
No timing assertions: the figures come from a GPU run (docs/benchmarks.md)."""

import json
import numbers

import pytest
import torch

from retnet.bench import gpu, gpu_cells


def _run(out, *extra):
    return gpu.main(["--device", "cpu", "--quick", "--out", str(out), *extra])


def _rows(data):
    return [row for section in gpu.SECTIONS for row in data[section]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run in which the step check raises (as a cell can, e.g. out of memory); no
    budget, so that a busy machine skips nothing (test_a_zero_budget_skips_every_cell)."""
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"

    def boom(plan, case):
        raise RuntimeError("boom\nsecond line")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_cells, "check_step", boom)
        _run(out, "--budget-s", "1e9")
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_every_section_and_the_summary(quick_run):
    out, data = quick_run
    assert set(gpu.SECTIONS) <= set(data)
    meta = data["meta"]
    assert meta["finished"] and meta["quick"]
    assert {"torch", "triton", "transformers"} <= set(meta["machine"]["versions"])
    assert meta["parameters"]["llama_non_embedding"] > 0
    assert len(data["train"]) == 2 * len(gpu.TRAINERS)
    assert len(data["decode"]) == 4 * len(gpu.DECODERS)
    summary = out.with_suffix(".md").read_text()
    for title in ("Kernel against reference", "Training step", "Decode step"):
        assert title in summary
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.slow
def test_every_cell_has_numbers_or_a_status(quick_run):
    _, data = quick_run
    for row in _rows(data):
        if row["status"] == "ok":
            assert any(isinstance(v, numbers.Number) or isinstance(v, dict)
                       for v in row["result"].values()), row
        else:
            assert row["status"].startswith(("skipped: ", "error: ")), row
    ok = {(r["name"], r.get("T")) for r in data["train"] if r["status"] == "ok"}
    lengths = gpu_cells.Plan.quick(torch.device("cpu")).lengths
    assert len(lengths) == 2 and {(n, T) for n in ("retnet-torch", "llama-sdpa")
                                  for T in lengths} <= ok
    assert all(r["result"]["tokens_per_s"] > 0 for r in data["train"] if r["status"] == "ok")
    assert all(r["status"] == "ok" for r in data["decode"] if r["name"] != "llama-static")


@pytest.mark.slow
def test_a_cell_that_raises_is_recorded_and_the_run_goes_on(quick_run):
    _, data = quick_run
    step = [r for r in data["check"] if r["name"] == "step"]
    assert [r["status"] for r in step] == ["error: RuntimeError: boom"]
    assert data["decode"][-1]["status"] == "ok"  # cells after it ran


def test_a_zero_budget_skips_every_cell(tmp_path):
    data = _run(tmp_path / "gpu.json", "--budget-s", "0")
    rows = _rows(data)
    assert rows and all(r["status"] == "skipped: budget" for r in rows)
    assert json.loads((tmp_path / "gpu.json").read_text())["meta"]["finished"]
    assert (tmp_path / "gpu.md").exists()
