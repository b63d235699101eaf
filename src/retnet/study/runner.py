"""`retnet study`: expand the grid, keep this shard's cells that have no record yet, run them
one after another or in N worker processes (each cell appends its record as it finishes),
then regenerate the report from every record in the folder."""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from retnet.compare.config import VARIANTS
from retnet.device import check_device, cpu_name, pick_device
from retnet.options import AT_LEAST_ONE, check_options, opt
from retnet.study import grid as grids
from retnet.study import store
from retnet.study.presets import PRESETS, to_toml


@dataclass
class StudyOptions:
    """Run options of `retnet study`; what the study is (sizes, budget, cells) is its grid."""

    grid: str = opt("cpu", f"a preset ({', '.join(PRESETS)}) or a .toml grid file "
                    "(--print-grid shows the format)")
    quick: bool = opt(False, "the quick grid: 2 sizes, 1 seed, 3 architectures, a few steps")
    out: str = opt("runs/study", "the study's folder: cells.jsonl, report.md, plots; "
                   "running again continues it")
    parallel: int = opt(1, "cells run at a time, each in its own process (CPU threads are "
                        "shared out among them)", bounds=AT_LEAST_ONE)
    shard: str | None = opt(None, "run only slice I of N of the cells (I/N, 0-based: one per "
                            "machine or GPU; under torchrun RANK/WORLD_SIZE)", metavar="I/N")
    data: str | None = opt(None, "text file, .jsonl, directory or glob (default: the grid's, "
                           "else the stdlib corpus)")
    retry: bool = opt(False, "run again the cells whose record is not 'done' (failed, "
                      "diverged, too slow)")
    report_only: bool = opt(False, "regenerate report.md and the plots; train nothing")
    print_grid: bool = opt(False, "print the grid as TOML and its cells, then exit")
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu; under torchrun cuda:LOCAL_RANK)")

    def __post_init__(self) -> None:
        check_options(self)
        check_device(self.device)
        if self.quick:
            self.grid = "quick"
        self.shard_index, self.shard_count = parse_shard(self.shard)


def parse_shard(text: str | None) -> tuple[int, int]:
    """"I/N" -> (I, N); None -> torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"--shard {text!r} must be I/N with 0 ≤ I < N, e.g. 0/4")
    return int(i), int(n)


def device_of(opts: StudyOptions) -> torch.device:
    device = pick_device(opts.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def load_grid(opts: StudyOptions) -> grids.Grid:
    grid = grids.load(opts.grid, tuple(VARIANTS))
    if opts.data is not None:
        grid = replace(grid, budget=replace(grid.budget, data=opts.data))
    return grid


def prepare_data(budget: grids.Budget, out: str):
    """The tokenizer (a BPE trained once per study, saved in OUT) and the windows; cached per
    process, so a worker prepares them once for all its cells."""
    return _prepared(budget.data, budget.tokenizer, budget.vocab_size, budget.seq_len,
                     budget.batch_size, budget.eval_batches, out)


@functools.lru_cache(maxsize=2)
def _prepared(source: str | None, kind: str, vocab_size: int, seq_len: int, batch_size: int,
              eval_batches: int, out: str):
    from retnet.data import PackedWindows, load_documents, split_documents, tokenize
    from retnet.study.cell import Data
    from retnet.study.evaluate import LENGTH_FACTOR, POSITION_WINDOWS
    from retnet.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

    train_docs, val_docs = split_documents(load_documents(source))
    path = Path(out) / "tokenizer.json"
    if kind == "byte":
        tok = ByteTokenizer()
    elif path.is_file():
        tok = load_tokenizer(path)
    else:
        tok = train_bpe((d.text for d in train_docs), vocab_size)
        tok.save(path)  # atomic: parallel workers read it whole or not at all
    train_tokens, _ = tokenize(train_docs, tok, "study-train")
    val_tokens, _ = tokenize(val_docs, tok, "study-val")
    val = PackedWindows(val_tokens, seq_len, "validation split")
    long_val = []  # a split shorter than one long window: loss by position is not measured
    if len(val_tokens) > LENGTH_FACTOR * seq_len:
        long_val = PackedWindows(val_tokens, LENGTH_FACTOR * seq_len, "validation split"
                                 ).evaluation_batches(1, POSITION_WINDOWS)
    return Data(tok, PackedWindows(train_tokens, seq_len, "training split"),
                val.evaluation_batches(batch_size, eval_batches), long_val)


def pending(grid: grids.Grid, out: Path, opts: StudyOptions) -> list[grids.Cell]:
    """This shard's cells without a record (or, with --retry, without a 'done' one)."""
    done = store.records(out)
    mine = [c for i, c in enumerate(grid.cells()) if i % opts.shard_count == opts.shard_index]
    return [c for c in mine if c.id not in done
            or (opts.retry and done[c.id].get("status") != "done")]


def recall_data(recall: grids.Recall, batch_size: int):
    """An MQAR cell's Data: the recall rows, and fixed validation rows from the test stream."""
    from retnet.study.cell import Data
    from retnet.study.mqar import TEST_SEED, RecallBatches
    from retnet.tokenizer import ByteTokenizer

    batches = RecallBatches(recall)
    val = [batches.batch(TEST_SEED + 1, i, batch_size) for i in range(4)]
    return Data(ByteTokenizer(), batches, val, [])


def run_one(cell: grids.Cell, grid: grids.Grid, out: str, device: str,
            threads: int | None) -> dict[str, Any] | None:
    """Run a cell and append its record; None when another process holds it."""
    from retnet.study.cell import run_cell

    if threads:
        torch.set_num_threads(threads)
    with store.cell_lock(Path(out), cell.id) as mine:
        if not mine:
            return None
        began = time.perf_counter()
        try:
            folder, where = Path(out) / "cells" / cell.id, torch.device(device)
            if cell.task == "mqar":
                budget = grid.recall.budget(grid.budget)
                outcome = run_cell(cell, budget, recall_data(grid.recall, budget.batch_size),
                                   folder, where, grid.recall)
            else:
                outcome = run_cell(cell, grid.budget, prepare_data(grid.budget, out), folder,
                                   where)
        except ImportError as err:
            outcome = {"status": "unavailable", "reason": _line(err)}
        except Exception as err:  # a cell that cannot run is a result: recorded, not fatal
            outcome = {"status": "failed", "reason": f"{type(err).__name__}: {_line(err)}"}
        record = {"id": cell.id, **_cell_fields(cell), **outcome,
                  "wall_seconds": time.perf_counter() - began, "machine": machine(device)}
        store.append(Path(out), record)
        return record


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _cell_fields(cell: grids.Cell) -> dict[str, Any]:
    return {"task": cell.task, "arch": cell.arch, "size": cell.size.name,
            "d_model": cell.size.d_model, "n_layers": cell.size.n_layers,
            "variant": cell.variant, "lr": cell.lr, "seed": cell.seed}


def machine(device: str) -> dict[str, Any]:
    import transformers

    return {"device": device, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def run(opts: StudyOptions) -> list[dict[str, Any]]:
    """Every pending cell of this shard; returns the records made by this call."""
    out, grid = Path(opts.out), load_grid(opts)
    store.check_budget(out, grid, grid.budget.data)
    todo, device = pending(grid, out, opts), device_of(opts)
    if not todo:
        return []
    prepare_data(grid.budget, str(out))  # the BPE once, before any worker needs it
    if opts.parallel == 1:
        return [r for c in todo if (r := _report(run_one(c, grid, str(out), str(device),
                                                         None)))]
    threads = max(1, (os.cpu_count() or 1) // opts.parallel) if device.type == "cpu" else None
    made = []
    with ProcessPoolExecutor(opts.parallel, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, c, grid, str(out), str(device), threads)
                   for c in todo]
        for f in as_completed(futures):
            if (record := _report(f.result())) is not None:
                made.append(record)
    return made


def _report(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is not None:
        loss = record.get("val_loss")
        extra = f"val loss {loss:.4f}" if loss is not None else record.get("reason", "")
        rate = record.get("tokens_per_s")
        print(f"{record['id']:40s} {record['status']:11s} {extra}"
              + (f"  {rate:,.0f} tokens/s" if rate else ""), flush=True)
    return record


def command(opts: StudyOptions) -> int:
    """`retnet study`: run what is pending, then write the report from every record."""
    from retnet.study.report import write_report

    grid = load_grid(opts)
    if opts.print_grid:
        print(to_toml(PRESETS[opts.grid]) if opts.grid in PRESETS else Path(opts.grid).read_text())
        for c in grid.cells():
            print(f"# {c.id}")
        return 0
    if not opts.report_only:
        run(opts)
    path = write_report(Path(opts.out), grid)
    done = store.records(Path(opts.out))
    print(f"{len(done)} of {len(grid.cells())} cells recorded; report: {path}")
    return 0

