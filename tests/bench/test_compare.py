"""`retnet compare`: the quick mode end to end, matched sizes, identical batches."""

import json

import pytest

from retnet.cli import main
from retnet.compare import CompareConfig, build_models, non_embedding


@pytest.mark.slow
def test_quick_compare_writes_report_plots_and_json(corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--data", str(corpus), "--out", str(out),
                 "--variants", "no-decay"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["retnet", "transformer", "retnet-no-decay"]
    # byte-identical batches for every model, in the same order
    assert len({tuple(r["batch_hashes"]) for r in results["runs"]}) == 1
    for r in results["runs"]:
        assert len(r["curve"]) >= 2 and len(r["loss_by_position"]) == 8
        assert "acc,none" in r["zero_shot"]["python_mc"]
        assert r["tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    assert "byte-identical batches: True" in report
    for png in ("curves.png", "positions.png"):
        assert (out / png).stat().st_size > 1000


def test_default_models_are_matched_within_5_percent():
    models = build_models(CompareConfig(variants=["no-gate", "small-heads"]), 4096, seed=0)
    ret, llama = non_embedding(models["retnet"]), non_embedding(models["transformer"])
    assert abs(llama / ret - 1) < 0.05
    assert 2_000_000 <= ret <= 3_000_000
    assert models["retnet-small-heads"].model.config.key_head_dim == 32
    assert models["retnet-no-gate"].model.blocks[0].retention.g_proj is None
