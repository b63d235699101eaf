"""`retnet train --eval-tasks`: lm-eval tasks run in-process on the model being trained every N
steps, each task's main metric logged beside the loss. Training is left exactly as it was: the
tasks run in eval mode without gradients, and every RNG they reseed is put back."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from retnet.tokenizer import Tokenizer


def check_tasks(tasks: Sequence[str]) -> None:
    """Before training: a one-line ValueError naming the unknown tasks (lm-eval's own
    registry, the shipped tasks, or task YAML files)."""
    from retnet.eval.tasks import check_task_names, task_manager

    check_task_names(task_manager(tasks).all_tasks, tasks)


def task_metrics(model: torch.nn.Module, tokenizer: Tokenizer, tasks: Sequence[str],
                 limit: int) -> dict[str, float]:
    """{"eval/TASK/METRIC": value}: each task's main metric (the first of its metric_list),
    scored on up to `limit` documents per task; the model comes back in the mode it was in.

    lm-eval seeds Python's, NumPy's and torch's global generators (and the adapter puts the
    model in eval mode), so all are saved and restored: the run's dropout draws and batches
    are those of a run without the tasks."""
    from retnet.eval.tasks import evaluate_tasks

    device = next(model.parameters()).device
    accelerator = [] if device.type == "cpu" else [device]  # its generator forked too
    training, py_state, np_state = model.training, random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(accelerator, device_type=device.type if accelerator
                                   else None), torch.no_grad():
            out = evaluate_tasks(model, tokenizer, tasks, limit=limit)
    finally:
        model.train(training)
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {f"eval/{task}/{metric}": value
            for task, results in out["results"].items()
            for metric, value in [main_metric(results)] if value is not None}


def main_metric(results: dict) -> tuple[str, float | None]:
    """(name, value) of a task's first metric in lm-eval's results (`acc` from "acc,none"; a
    filter other than "none" stays in the name); (name, None) when it has none."""
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            return (metric if filter_name == "none" else key), float(value)
    return "", None
