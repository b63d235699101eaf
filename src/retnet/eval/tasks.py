"""The one lm-evaluation-harness driver, used by `retnet eval` and `retnet compare`, and the
task files shipped inside the package (found with importlib.resources, so a wheel works)."""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Sequence
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import torch

# `    test: NAME.jsonl` in a shipped YAML names a data file beside it.
_DATA_LINE = re.compile(r"^(\s+\w+:\s*)(\S+\.jsonl)\s*$", re.M)


@functools.cache
def shipped_tasks() -> Path:
    """A temporary folder holding the shipped task YAMLs with their data paths made absolute
    (lm-eval reads data paths relative to the working directory); one per process."""
    folder = Path(tempfile.mkdtemp(prefix="retnet-tasks-"))
    with as_file(files("retnet.eval") / "tasks") as source:
        for yaml_file in sorted(Path(source).glob("*.yaml")):
            text = _DATA_LINE.sub(lambda m: f"{m[1]}{Path(source, m[2]).resolve()}",
                                  yaml_file.read_text())
            (folder / yaml_file.name).write_text(text)
    return folder


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: Sequence[str], *,
                   include_path: str | None = None, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 8, log_samples: bool = False,
                   gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """lm-eval's whole output (`results`, `samples` with log_samples, `config`, ...) for a
    RetNetLM (or anything with its call signature, such as compare's transformers shim); the
    shipped tasks are always available by name."""
    from lm_eval import simple_evaluate

    from retnet.eval.harness import RetNetHarnessLM, quiet_git  # registers "retnet"

    quiet_git()
    manager = task_manager(tasks, include_path)
    check_task_names(manager.all_tasks, tasks)
    lm = RetNetHarnessLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples, gen_kwargs=gen_kwargs)


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager over the shipped tasks and include_path's; lm-eval's own task
    files (~15k tasks, about 20 s to index) are indexed as well only when a task is not
    found among those. Each index is built once per process."""
    paths = (str(shipped_tasks()), *([include_path] if include_path else []))
    ours = _task_manager(paths, include_defaults=False)
    if all(t in ours.all_tasks for t in tasks):
        return ours
    return _task_manager(paths, include_defaults=True)


@functools.cache
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def check_task_names(known: Sequence[str], tasks: Sequence[str]) -> None:
    """A one-line ValueError naming the tasks that are neither a registered task, group or tag
    nor a YAML file (lm-eval's own KeyError comes as a traceback)."""
    names = set(known)
    unknown = [t for t in tasks if t not in names and not Path(t).is_file()]
    if unknown:
        raise ValueError(f"--tasks: no lm-eval task, group or tag named "
                         f"{', '.join(map(repr, unknown))}; list them with `retnet lm-eval ls "
                         "tasks`, or pass a task YAML file (or a folder of them with "
                         "--include-path)")


def run_tasks(model: torch.nn.Module, tokenizer, tasks: Sequence[str],
              **kwargs: Any) -> dict[str, dict[str, Any]]:
    """lm-eval's results per task (`evaluate_tasks`'s `results`)."""
    return evaluate_tasks(model, tokenizer, tasks, **kwargs)["results"]
