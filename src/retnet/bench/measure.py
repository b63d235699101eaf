"""How every benchmark measures and reports, written once: wall-clock timing and its summary,
the retention form they prefill and train with, a memory cap, one process per cell, and the
header, JSON and Markdown files of a benchmark script's results."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from retnet.ops import CHUNKWISE

# 128, not DEFAULT_CHUNK_SIZE: the chunk every published benchmark figure (docs/benchmarks.md)
# was measured with; prefill and chunkwise training use it alike.
BENCH_FORM = replace(CHUNKWISE, chunk_size=128)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat_timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """`warmup` untimed calls, then the seconds of each of `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn) for _ in range(repeats)]


def median_ms(fn: Callable[[], Any], n: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of n calls after `warmup` untimed ones."""
    return 1e3 * statistics.median(repeat_timed(fn, n, warmup))


def summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and max seconds, with every raw timing kept."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "raw_s": list(times)}


def spread(result: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """"median (min–max)" of a `summary`, times scale (1e3: milliseconds)."""
    lo, mid, hi = (scale * result[k] for k in ("min_s", "median_s", "max_s"))
    return f"{mid:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of values by rank, without interpolation."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, int(q * len(ranked)))]


def cap_memory(gib: float) -> None:
    """Cap this process's address space, so that an allocation beyond `gib` raises (and is
    recorded as out of memory) instead of swapping the machine or waking the OOM killer."""
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def spawn_cell(args: Sequence[str]) -> dict[str, Any]:
    """Run `python ARGS` in a fresh process (so its peak memory is its own) and return the JSON
    object on the last line of its stdout with status "ok"; on a failure, the status
    ("out of memory" or "failed") and the last line of its stderr."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode == 0:
        return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
    err = proc.stderr.strip()
    # a negative code is a signal: the kernel's OOM killer, or an abort inside an allocation
    oom = "MemoryError" in err or "alloc" in err.lower() or proc.returncode < 0
    return {"status": "out of memory" if oom else "failed",
            "error": err.splitlines()[-1] if err else f"exit code {proc.returncode}"}


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines: the column names, the separator, one line per row."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_results(out: str | Path, name: str, data: Any, lines: list[str]) -> str:
    """Write OUT/NAME.json (the raw data) and OUT/NAME.md (the report), print the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
    return text


def script_parser(doc: str, out: str = "benchmarks/results",
                  cell: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    """A benchmark script's arguments: its docstring's first line as the description, the
    flags every script has (--preset, the model size; --out, where its files go) and, for a
    script that runs each cell in its own process (`spawn_cells`), the hidden --cell A B."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--out", default=out)
    if cell:
        p.add_argument("--cell", nargs=2, metavar=cell, help=argparse.SUPPRESS)
    return p


def spawn_cells(module: str, cells: Sequence[Sequence[Any]], common: Sequence[str],
                desc: str) -> list[dict[str, Any]]:
    """`python -m module --cell A B COMMON...` for each cell (A, B) in a fresh process, with a
    progress bar; each cell's result as `spawn_cell` returns it."""
    from tqdm import tqdm

    return [spawn_cell(["-m", module, "--cell", *map(str, cell), *common])
            for cell in tqdm(cells, desc=desc, unit="cell")]


def run_script(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               cell: Callable[[argparse.Namespace], dict[str, Any]],
               sweep: Callable[[argparse.Namespace], None]) -> None:
    """A cell-per-process script's main: inside a cell's process (--cell A B), print the result
    of `cell(args)` as the one JSON line `spawn_cell` reads; otherwise run `sweep(args)`, which
    spawns the cells (`spawn_cells`) and writes the results."""
    args = parser.parse_args(argv)
    if getattr(args, "cell", None):
        print(json.dumps(cell(args)))
    else:
        sweep(args)
