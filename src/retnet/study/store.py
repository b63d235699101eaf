"""A study's folder: cells.jsonl (one JSON record per finished cell, appended whole under a
lock, so parallel workers and shards never interleave), study.json (the budget every record
was made under), and cells/ID/ (a running cell's lock and checkpoints).

    OUT/study.json  cells.jsonl  report.md  *.png  tokenizer.json
    OUT/cells/retnet-s1-base-lr0.002-s0/lock  checkpoints/  latest
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retnet.files import append_text, atomic_write_text
from retnet.study.grid import Grid

RECORDS = "cells.jsonl"


def records(out: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell id (a retried cell's newer record wins); a line cut off
    by a kill mid-append is skipped (it can only be the last one)."""
    path = Path(out) / RECORDS
    found: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            found[record["id"]] = record
    return found


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (created); yields False when not blocking and it is held
    by another process. The kernel drops it when its holder dies, so a kill leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def append(out: Path, record: dict[str, Any]) -> None:
    """Add one record as one line, whole or not at all."""
    with _locked(Path(out) / (RECORDS + ".lock")):
        append_text(Path(out) / RECORDS, json.dumps(record) + "\n")


def cell_lock(out: Path, cell_id: str):
    """Held while a cell runs: a second process (another shard given the same slice, a second
    invocation) skips the cell instead of training it twice."""
    return _locked(Path(out) / "cells" / cell_id / "lock", blocking=False)


def check_budget(out: Path, grid: Grid, data: str | None) -> None:
    """Records of one folder are comparable only under one budget and one [recall] table: the
    first run writes them, later runs must match (new sizes, blocks, seeds are fine, and so
    are new per-architecture learning rates: a rate is part of the cell's id). A folder made
    before the recall table existed takes it from the first run that has one."""
    budget = {**dataclasses.asdict(grid.budget), "data": data}
    budget.pop("lr_by_arch")
    recall = json.loads(json.dumps(dataclasses.asdict(grid.recall)))  # tuples as lists
    path = Path(out) / "study.json"
    with _locked(Path(out) / "study.json.lock"):
        if not path.is_file():
            atomic_write_text(path, json.dumps({"grid": grid.name, "budget": budget,
                                                "recall": recall}, indent=1))
            return
        stored = json.loads(path.read_text())
        if "recall" not in stored:
            atomic_write_text(path, json.dumps({**stored, "recall": recall}, indent=1))
            stored["recall"] = recall
    for what, mine, theirs in (("budget", budget, stored["budget"]),
                               ("recall", recall, stored["recall"])):
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            raise ValueError(f"{out} holds a study made with another {what} ("
                             f"{', '.join(changed)} differ: "
                             f"{', '.join(f'{k}={theirs.get(k)!r}' for k in changed)}); use "
                             f"the same grid {what} or another --out")
