"""`retnet lm-eval`: lm-eval's own command line, run as a user runs it (a subprocess, on this
CPU-only machine, with `batch_size` inside --model_args and a task folder of the user's own),
gives the log-likelihoods and scores of the in-process adapter that `retnet eval` uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recall import save_recall_run
from retnet.cli import main
from retnet.eval.lm_eval_command import adjust

LIMIT = 6


def user_task(folder: Path) -> Path:
    """A copy of the shipped retnet_mc under another name, in a folder of the user's."""
    shipped = Path(__file__).parents[2] / "src" / "retnet" / "eval" / "tasks"
    folder.mkdir()
    text = (shipped / "retnet_mc.yaml").read_text().replace("task: retnet_mc", "task: my_mc")
    (folder / "my_mc.yaml").write_text(text.replace("mc.jsonl", str(shipped / "mc.jsonl")))
    return folder


@pytest.mark.slow
def test_lm_eval_command_scores_like_retnet_eval(tmp_path):
    from retnet.eval.harness import RetNetHarnessLM
    from retnet.loading import load
    from servers import evaluate, loglikelihoods

    run = save_recall_run(tmp_path / "run")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "retnet", "lm-eval", "--model", "retnet",
           "--model_args", f"checkpoint={run},batch_size=3", "--tasks", "retnet_mc,my_mc",
           "--include_path", str(user_task(tmp_path / "mine")), "--limit", str(LIMIT),
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # lm-eval alone would ask for cuda:0
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = out.rglob("results_*.json")
    got = json.loads(written.read_text())
    assert got["config"]["batch_size"] == "3" and got["config"]["device"] == "cpu"
    model, tok = load(run)
    local = evaluate(RetNetHarnessLM(model=model, tokenizer=tok, batch_size=3))
    expected = loglikelihoods(local)
    for task in ("retnet_mc", "my_mc"):
        [samples] = out.rglob(f"samples_{task}_*.jsonl")
        rows = sorted(map(json.loads, samples.read_text().splitlines()),
                      key=lambda s: s["doc_id"])
        lls = [tuple(r[0]) for s in rows for r in s["resps"]]
        assert len(lls) == len(expected) >= 2 * LIMIT
        for (lp, greedy), (ref_lp, ref_greedy) in zip(lls, expected):
            # the samples file holds them as strings
            assert float(lp) == pytest.approx(ref_lp, abs=1e-5)
            assert greedy in (str(ref_greedy), ref_greedy)
        for metric in ("acc,none", "acc_norm,none"):
            assert got["results"][task][metric] == local["results"]["retnet_mc"][metric]


def test_batch_size_in_two_places_must_agree():
    import argparse

    args = argparse.Namespace(model_args={"checkpoint": "x", "batch_size": "4"},
                              batch_size="8", device="cpu", include_path=None, config=None)
    with pytest.raises(ValueError, match="batch_size=4 in --model_args but --batch_size 8"):
        adjust(args)


def test_lm_eval_without_its_extra_fails_in_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--model", "retnet", "--tasks", "retnet_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("retnet lm-eval: error: this needs the [eval] extra (lm_eval missing): "
                   "pip install 'retnet-exact[eval]'")


def test_retnet_model_args_name_the_results_folder_after_the_run():
    """lm-eval takes the folder's name from pretrained= (and the like), else a random one:
    results landed in `results/i82qcls7/` (#34)."""
    import argparse

    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    args = argparse.Namespace(model="retnet", model_args={"checkpoint": "runs/demo"},
                              batch_size=None, device="cpu", include_path=None, config=None)
    adjust(args)
    assert GeneralConfigTracker._get_model_name(args.model_args) == "runs/demo"


def test_the_git_hash_is_recorded_without_git_talking_outside_a_clone(tmp_path, monkeypatch,
                                                                        capfd):
    """lm-eval let git print `fatal: not a git repository` on every run outside a clone."""
    import lm_eval.evaluator

    from retnet.eval.harness import quiet_git

    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash",
                        lm_eval.evaluator.get_git_commit_hash)  # restored afterwards
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    quiet_git()
    assert lm_eval.evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""


def test_the_shipped_tasks_load_without_warnings(caplog):
    """retnet_rolling declared no aggregation nor direction for its metrics: six lm-eval
    warnings on every run."""
    import logging

    from retnet.eval.tasks import task_manager

    names = ["retnet_mc", "retnet_rolling", "retnet_gen", "python_mc"]
    with caplog.at_level(logging.WARNING):
        task_manager(names).load(names)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == []
