"""`retnet study`: the quick study end to end (the report's numbers against the cell records),
kill and resume (finished cells not rerun, the resumed cell equal to an uninterrupted run),
shards, parallel workers, matched architectures, and one-line errors for bad grids."""

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retnet.cli import main
from retnet.compare.config import VARIANTS
from retnet.model import RetNetConfig, RetNetLM
from retnet.study import StudyOptions, load
from retnet.study.archs import builder, target_parameters
from retnet.study.runner import pending
from retnet.study.store import records

TINY = """
[budget]
batch_size = 4
seq_len = 32
tokens_per_param = 0.001
min_steps = {steps}
eval_batches = 2
checkpoint_every = 2
tokenizer = "byte"

[sizes.t]
d_model = 32
n_layers = 1

[[block]]
archs = {archs}
sizes = ["t"]
seeds = [0]
"""


def tiny_grid(tmp_path: Path, steps: int = 6, archs=("retnet", "llama")) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(steps=steps, archs=json.dumps(list(archs))))
    return path


def _row(report: str, first_cell: str, section: str = "") -> list[str]:
    """The cells of the first table row starting with `first_cell` (after `## section`)."""
    text = report.split(f"## {section}\n", 1)[1] if section else report
    line = next(x for x in text.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_quick_study_report_matches_the_cell_records(corpus, tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["study", "--quick", "--data", str(corpus), "--out", str(out)]) == 0
    every = records(out)
    found = {k: r for k, r in every.items() if r["task"] == "lm"}
    assert len(found) == 6 and {r["arch"] for r in found.values()} == {"retnet", "llama",
                                                                       "linear"}
    report = (out / "report.md").read_text()
    for r in found.values():
        assert r["status"] == "done" and r["tokens_per_s"] > 0 and r["peak_mib"] >= 0
        assert abs(r["non_embedding"] / r["target_non_embedding"] - 1) < 0.01
        assert r["val_loss"] == r["curve"][-1]["val_loss"]
        row = _row(report, r["id"])
        assert row[5] == f"{r['val_loss']:.4f}"
        assert row[6] == f"{r['tokens_per_s_median_step']:,.0f}"
    for arch in ("retnet", "llama", "linear"):  # the seed summary against the records
        for size in ("q1", "q2"):
            rs = [r for r in found.values() if (r["arch"], r["size"]) == (arch, size)]
            line = next(x for x in report.splitlines()
                        if x.startswith(f"| {arch} | {size} | base |"))
            assert f"| {statistics.mean(r['val_loss'] for r in rs):.4f} (" in line
        # loss by position and few-shot accuracy, each table row against the records
        assert len(r["loss_by_position"]) == 8 and set(r["few_shot"]["python_mc"]) == {"0", "3"}
        if r["size"] == "q2":
            cells = _row(report, r["arch"], "Loss by position")[1:]
            assert cells == [f"{x:.3f}" for x in r["loss_by_position"]]
        shots = _row(report, f"{r['arch']} | {r['size']}", "Zero- and few-shot")[3:]
        assert shots == [f"{r['few_shot']['python_mc'][k]:.3f}" for k in ("0", "3")]
        cost = _row(report, f"{r['size']} | {r['arch']}", "Training cost")
        ref = next(x for x in found.values() if (x["size"], x["arch"]) == (r["size"], "retnet"))
        rate = r["tokens_per_s_median_step"] / ref["tokens_per_s_median_step"]
        assert cost[3] == f"{rate:.2f}" and r["tokens_per_s_fast_steps"] >= r[
            "tokens_per_s_median_step"]
    recall = [r for r in every.values() if r["task"] == "mqar"]
    assert {r["arch"] for r in recall} == {"retnet", "llama"}
    for r in recall:  # trained on recall rows: vocabulary and steps of the [recall] table
        assert r["status"] == "done" and r["steps"] == 4 and r["model"]["vocab_size"] == 34
        row = _row(report, f"{r['arch']} | {r['d_model']}", "Recall (MQAR)")[2:]
        assert row == [f"{r['recall_accuracy'][n]:.3f}" for n in ("2", "4")]
    assert "read byte-identical batches: True" in report
    for png in ("loss_vs_params", "loss_vs_flops", "throughput", "mqar", "loss_by_position"):
        assert (out / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in report
    lines = (out / "cells.jsonl").read_text()
    capsys.readouterr()
    assert main(["study", "--quick", "--data", str(corpus), "--out", str(out)]) == 0
    assert (out / "cells.jsonl").read_text() == lines  # finished cells are never rerun
    assert "8 of 8 cells recorded" in capsys.readouterr().out


def _run_until_mid_cell(args: list[str], out: Path) -> None:
    """Start the study in a subprocess and SIGKILL it once one cell is recorded and another
    has a checkpoint (mid-cell)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retnet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = records(out)
            started = [p for p in out.glob("cells/*/latest") if p.parent.name not in done]
            if done and started:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.02)
        pytest.fail(f"the study ended (rc {proc.poll()}) before it could be killed mid-cell")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_killed_study_resumes_mid_cell_and_equals_an_uninterrupted_run(corpus, tmp_path):
    grid = tiny_grid(tmp_path, steps=16)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    common = ["study", "--grid", str(grid), "--data", str(corpus)]
    _run_until_mid_cell([*common, "--out", str(killed)], killed)
    first = (killed / "cells.jsonl").read_text()
    assert len(first.splitlines()) == 1
    assert main([*common, "--out", str(killed)]) == 0
    assert (killed / "cells.jsonl").read_text().startswith(first)  # not rerun, not rewritten
    assert main([*common, "--out", str(whole)]) == 0
    resumed, reference = records(killed), records(whole)
    assert len((killed / "cells.jsonl").read_text().splitlines()) == 2
    second = next(r for r in resumed.values() if r["resumed_at"])
    assert second["resumed_at"][0] > 0  # it continued from a checkpoint, not from step 0
    ref = reference[second["id"]]
    # same batches, and on this CPU the same numbers: resuming is exact
    assert second["batches_sha256"] == ref["batches_sha256"]
    assert second["curve"] == ref["curve"]
    assert not list((killed / "cells").glob("*/checkpoints/step-*"))  # removed when done


def test_shards_split_the_cells_once(tmp_path):
    grid = load("cpu", tuple(VARIANTS))
    parts = [pending(grid, tmp_path, StudyOptions(shard=f"{i}/3")) for i in range(3)]
    ids = [c.id for part in parts for c in part]
    assert sorted(ids) == sorted(c.id for c in grid.cells()) and len(set(ids)) == len(ids)


@pytest.mark.slow
def test_parallel_workers_record_every_cell(corpus, tmp_path):
    out = tmp_path / "par"
    grid = tiny_grid(tmp_path, steps=4, archs=("retnet", "linear"))
    assert main(["study", "--grid", str(grid), "--data", str(corpus), "--out", str(out),
                 "--parallel", "2"]) == 0
    found = records(out)
    assert sorted(found) == ["linear-t-base-lr0.002-s0", "retnet-t-base-lr0.002-s0"]
    assert all(r["status"] == "done" and r["machine"]["threads"] == 1 for r in found.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mamba", "mamba2", "rwkv", "linear"])
def test_every_architecture_is_matched_to_the_retnet_of_its_size(arch):
    cell = next(c for c in load("cpu", tuple(VARIANTS)).cells()
                if c.arch == arch and c.size.name == "s2")
    with torch.device("meta"):
        model = builder(cell, 1024)()
    assert abs(model.non_embedding() / target_parameters(cell, 1024) - 1) < 0.01


def test_linear_attention_is_retention_without_rotation_decay_or_gate():
    config = RetNetConfig.from_preset("tiny", vocab_size=64, rotation=False, decays="none",
                                      use_gate=False)
    retention = RetNetLM(config).blocks[0].retention
    pos = retention.encode_positions(torch.arange(9)[None], torch.float32)
    assert torch.equal(pos.rotation, torch.ones_like(pos.rotation))
    assert retention.g_proj is None
    # an older config's fingerprint is unchanged by the new field at its default
    old = {k: v for k, v in RetNetConfig.from_preset("tiny").to_dict().items()
           if k not in ("dropout", "rotation")}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert RetNetConfig.from_preset("tiny").fingerprint() == digest
    assert config.fingerprint() != RetNetConfig.from_dict(
        {**config.to_dict(), "rotation": True}).fingerprint()


BAD = {
    "unknown arch": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = ["gpt"]\n'
                     'sizes = ["a"]\n', "archs has 'gpt'; choose from"),
    "unknown size": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = ["retnet"]\n'
                     'sizes = ["b"]\n', "sizes has 'b'; choose from a"),
    "variant of a rival": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = '
                           '["llama"]\nsizes = ["a"]\nvariants = ["no-gate"]\n',
                           "are options of RetNet"),
    "bad seeds": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = ["retnet"]\n'
                  'sizes = ["a"]\nseeds = [-1]\n', "seeds must be"),
    "unknown budget key": ('[budget]\nsteps = 3\n[sizes.a]\nd_model = 32\nn_layers = 1\n'
                           '[[block]]\narchs = ["retnet"]\nsizes = ["a"]\n',
                           "budget.steps is not a field"),
    "zero lr": ('[budget]\nlr = 0\n[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\n'
                'archs = ["retnet"]\nsizes = ["a"]\n', "budget lr must be a number > 0"),
    "no block": ('[sizes.a]\nd_model = 32\nn_layers = 1\n', "no [[block]]"),
    "not toml": ("archs = [\n", "is not valid TOML"),
    "unknown task": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = ["retnet"]\n'
                     'sizes = ["a"]\ntask = "copy"\n', "task 'copy'; choose from lm, mqar"),
    "recall rows too short": ('[recall]\nseq_len = 16\npairs = [8]\n[sizes.a]\nd_model = 32\n'
                              'n_layers = 1\n[[block]]\narchs = ["retnet"]\nsizes = ["a"]\n',
                              "recall.seq_len 16 cannot hold 8 pairs"),
    "ablation of recall": ('[sizes.a]\nd_model = 32\nn_layers = 1\n[[block]]\narchs = '
                           '["retnet"]\nsizes = ["a"]\nvariants = ["no-gate"]\ntask = "mqar"\n',
                           "task mqar trains base models only"),
    "string width": ('[sizes.a]\nd_model = "big"\nn_layers = 1\n[[block]]\narchs = '
                     '["retnet"]\nsizes = ["a"]\n', "sizes.a.d_model must be an integer"),
}


@pytest.mark.parametrize("text,expected", BAD.values(), ids=BAD.keys())
def test_a_bad_grid_is_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["study", "--grid", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,expected", [(["--shard", "3/2"], "must be I/N"),
                                           (["--grid", "big"], "name a preset"),
                                           (["--parallel", "0"], "--parallel must be")])
def test_bad_options_are_one_line(tmp_path, capsys, args, expected):
    assert main(["study", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_folder_of_another_budget_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "s"
    grid = tiny_grid(tmp_path, steps=2, archs=("linear",))
    assert main(["study", "--grid", str(grid), "--data", str(corpus), "--out", str(out)]) == 0
    grid.write_text(grid.read_text().replace("seq_len = 32", "seq_len = 16"))
    assert main(["study", "--grid", str(grid), "--data", str(corpus), "--out", str(out)]) == 2
    assert "another budget (seq_len differ" in capsys.readouterr().err
    grid.write_text(grid.read_text().replace("seq_len = 16", "seq_len = 32")
                    + "\n[recall]\nsteps = 9\n")
    assert main(["study", "--grid", str(grid), "--data", str(corpus), "--out", str(out)]) == 2
    assert "another recall (steps differ: steps=800)" in capsys.readouterr().err
