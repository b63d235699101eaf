"""`retnet train --eval-tasks`: lm-eval tasks run on the model as it trains, their main metric
logged beside the loss (metrics.jsonl, TensorBoard), and the training itself unchanged."""

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from helpers import tiny_model
from retnet.cli import main
from retnet.tokenizer import ByteTokenizer
from retnet.train import TrainConfig, train
from retnet.train.eval_tasks import main_metric, task_metrics

# dropout on: a run whose RNG or train mode the tasks disturbed would lose differently
BASE = dict(preset="tiny", steps=4, batch_size=2, seq_len=16, warmup=0, eval_every=2,
            eval_batches=1, save_every=4, model={"dropout": 0.1})


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_tasks_are_logged_and_leave_the_loss_curve_unchanged(corpus, tmp_path):
    tasks = dict(eval_tasks="retnet_mc", eval_tasks_every=1, eval_tasks_limit=4)
    for name, extra in (("plain", {}), ("tasks", tasks)):
        train(TrainConfig(data=str(corpus), out=str(tmp_path / name), **BASE, **extra))
    plain, with_tasks = records(tmp_path / "plain"), records(tmp_path / "tasks")
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in with_tasks] == [r.get(key) for r in plain]
    assert all(0 <= r["eval/retnet_mc/acc"] <= 1 for r in with_tasks)
    assert not any(key.startswith("eval/") for r in plain for key in r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tasks" / "tensorboard")).Reload()
    assert len(events.Scalars("eval/retnet_mc/acc")) == 4


def test_task_metrics_put_back_every_rng_and_the_training_mode():
    """lm-eval reseeds Python's, NumPy's and torch's generators and the adapter sets eval mode:
    all four come back as they were."""
    model = tiny_model(torch.float32, vocab_size=258).train()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    got = task_metrics(model, ByteTokenizer(), ["retnet_mc"], limit=2)
    assert list(got) == ["eval/retnet_mc/acc"] and model.training
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_the_main_metric_is_the_first_one_lm_eval_reports():
    assert main_metric({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1,
                        "acc_norm,none": 0.25}) == ("acc", 0.5)
    assert main_metric({"alias": "g", "exact_match,strict-match": 1.0}) == (
        "exact_match,strict-match", 1.0)
    assert main_metric({"alias": "empty"}) == ("", None)


def test_eval_tasks_run_at_each_evaluation_unless_told():
    cfg = TrainConfig(eval_every=3, steps=10, eval_tasks="retnet_mc")
    assert [s for s in range(1, 11) if cfg.tasks_due(s, 10)] == [3, 6, 9, 10]
    cfg = TrainConfig(eval_every=3, steps=10, eval_tasks="retnet_mc", eval_tasks_every=4)
    assert [s for s in range(1, 11) if cfg.tasks_due(s, 10)] == [4, 8, 10]
    assert not any(TrainConfig(eval_every=3).tasks_due(s, 10) for s in range(1, 11))


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_eval_tasks_without_lm_eval_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1",
                 "--eval-tasks", "retnet_mc"]) == 2
    assert "[eval] extra (lm_eval missing)" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.slow
def test_an_unknown_task_is_one_line_before_training(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out),
                 "--steps", "1", "--eval-tasks", "retnet_mc,no_such_task"]) == 2
    assert "'no_such_task'" in one_line_error(capsys)
    assert not out.exists()


def test_eval_tasks_every_without_eval_tasks_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--eval-tasks-every", "5"]) == 2
    assert "--eval-tasks-every applies to --eval-tasks" in one_line_error(capsys)
