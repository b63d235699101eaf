"""`python benchmarks/gpu.py`: the GPU benchmark of issue 18, in one run of under 5 minutes.

    PYTHONPATH=src python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--quick]
                                            [--budget-s 280] [--device cuda]

1. check: the Triton chunkwise form (forward + backward) and the fused step against the
   PyTorch forms in float32 (largest relative error of outputs, final state, each gradient;
   recorded, not asserted);
2. ops: one retention op forward + backward at the training shapes (ours with Triton and
   with PyTorch, flash-linear-attention's chunk_retention / chunk_simple_gla when installed);
   train: tokens/s and peak memory of a training step (forward + backward, no optimizer) of
   a ~350M RetNet (Triton and PyTorch chunkwise) and transformers' Llama (sdpa) with matched
   non-embedding parameters, bf16 weights and autocast, eager, no CUDA graphs, at T = 2k, 8k,
   32k with 32k tokens per step;
3. decode: one step after 8k and 32k tokens at batch 1, 8, 64 (RetNet recurrent, PyTorch
   and Triton step; Llama static cache), states and caches filled with random values.

Every cell is recorded as it ends (the JSON rewritten atomically, so a cut run keeps what it
measured) with "status": "ok" and its "result", or "error: ..." / "skipped: ...". Cells past
--budget-s are "skipped: budget". A Markdown summary goes beside the JSON (gpu.md).
--quick --device cpu runs the same plumbing at tiny shapes in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from retnet.bench import gpu_cells as cells
from retnet.bench.measure import table
from retnet.files import atomic_write_text

SECTIONS = ("check", "ops", "train", "decode")
OPS = ("retnet-triton", "retnet-torch", "fla-chunk_retention", "fla-chunk_simple_gla")
TRAINERS = ("retnet-triton", "retnet-torch", "llama-sdpa")
DECODERS = ("retnet-torch", "retnet-triton", "llama-static")


@dataclass
class Cell:
    section: str
    params: dict[str, Any]  # what identifies it in the JSON (name, T, batch, ...)
    run: Callable[[], dict]


def plan_cells(plan: cells.Plan, models: cells.Models) -> list[Cell]:
    """Every cell of the run, in order; each training length / decode context runs all its
    models before the next, so a run cut short still compares them (one model's decode
    batches together: models are swapped as rarely as that allows)."""
    # late-bound through the module, so a test can replace one cell function
    out = [Cell("check", {"name": "chunkwise", "case": case},
                lambda case=case: cells.check_chunkwise(plan, case)) for case in plan.check_shapes]
    first = next(iter(plan.check_shapes))
    out.append(Cell("check", {"name": "step", "case": "B=8"},
                    lambda: cells.check_step(plan, first)))
    out += [Cell("ops", {"name": name, "T": T}, lambda n=name, T=T: cells.op_cell(plan, n, T))
            for T in plan.lengths for name in OPS]
    out += [Cell("train", {"name": name, "T": T},
                 lambda n=name, T=T: cells.train_cell(plan, models, n, T))
            for T in plan.lengths for name in TRAINERS]
    out += [Cell("decode", {"name": name, "context": c, "batch": b},
                 lambda n=name, c=c, b=b: cells.decode_cell(plan, models, n, b, c))
            for c in plan.contexts for name in DECODERS for b in plan.batches]
    return out


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_facts(device: torch.device) -> dict[str, Any]:
    """The GPU, its memory and the versions that matter (from the source tree or installed)."""
    from retnet.bench.machine import describe_machine

    facts = {"device": str(device), **describe_machine(), "cuda": torch.version.cuda,
             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    facts["versions"].update({name: _version(name) for name in (
        "triton", "flash-linear-attention", "fla-core")})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / cells.GiB, 1),
                     capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return facts


@dataclass
class Run:
    """The results being written: one JSON object, rewritten after every cell."""

    out: Path
    budget_s: float
    device: torch.device
    start: float = field(default_factory=time.perf_counter)
    data: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def record(self, cell: Cell) -> dict[str, Any]:
        row: dict[str, Any] = dict(cell.params)
        if self.elapsed() >= self.budget_s:
            row["status"] = "skipped: budget"
        else:
            row.update(attempt(cell.run))
            cells.free_memory(self.device)  # after the except block: an error's frames are released
        self.data[cell.section].append(row)
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 2)
        self.write()
        print(f"[{self.elapsed():7.1f}s] {cell.section:6} "
              + " ".join(f"{k}={v}" for k, v in cell.params.items()) + f": {brief(row)}",
              flush=True)
        return row

    def write(self) -> None:
        atomic_write_text(self.out, json.dumps(self.data, indent=1))
        atomic_write_text(self.out.with_suffix(".md"), "\n".join(summary(self.data)) + "\n")


def attempt(run: Callable[[], dict]) -> dict[str, Any]:
    """{"status": "ok", "result": ...}, or the skip / error (OOM included) as a status."""
    try:
        return {"status": "ok", "result": run()}
    except cells.Skip as why:
        return {"status": f"skipped: {why}"}
    except Exception as err:  # every failure, OOM included, is its cell's result
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return {"status": f"error: {type(err).__name__}: {first}"}


# The report ---------------------------------------------------------------------------------

def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} GiB"


def brief(row: dict[str, Any]) -> str:
    """A cell in a few words: its main figures, or its status."""
    if row["status"] != "ok":
        return row["status"]
    r = row["result"]
    if "max_rel_err" in r:
        worst = max((e for e in r["max_rel_err"].values() if e is not None), default=None)
        return "max rel err –" if worst is None else f"max rel err {worst:.1e}"
    if "ms_per_step" in r:
        return f"{r['ms_per_step']:.2f} ms/step, {r['tokens_per_s']:,.0f} tok/s"
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s']:,.0f} tok/s, peak {_gib(r['peak_gib'])}"
    return f"{r['ms']:.2f} ms, peak {_gib(r['peak_gib'])}"


def _pivot(rows: list[dict], keys: Sequence[str], names: Sequence[str]) -> list[list[Any]]:
    """One table row per distinct value of `keys`, one column per model name."""
    grouped: dict[tuple, dict[str, str]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), {})[row["name"]] = brief(row)
    return [[*key, *(by_name.get(n, "–") for n in names)] for key, by_name in grouped.items()]


def _check_table(rows: list[dict]) -> list[str]:
    quantities = list(dict.fromkeys(q for r in rows if r["status"] == "ok"
                                    for q in r["result"]["max_rel_err"]))
    body = []
    for r in rows:
        errors = r["result"]["max_rel_err"] if r["status"] == "ok" else {}
        cols = [f"{errors[q]:.1e}" if errors.get(q) is not None else "–" for q in quantities]
        body.append([r["name"], r["case"], *cols, "" if r["status"] == "ok" else r["status"]])
    return table(["form", "case", *quantities, "status"], body)


def summary(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    m, v = meta["machine"], meta["machine"]["versions"]
    lines = [f"`{meta['command']}` — {m.get('gpu', m['cpu'])}, torch {v['torch']}, CUDA "
             f"{m['cuda']}, triton {v['triton']}, transformers {v['transformers']}; "
             f"{meta['elapsed_s']} s", "", meta["setup"], "",
             "Kernel against reference (float32, max relative error):", "",
             *_check_table(data["check"]), "",
             "Retention op forward + backward (ms, peak memory), bf16 inputs:", "",
             *table(["T", *OPS], _pivot(data["ops"], ["T"], OPS)), "",
             "Training step, forward + backward (tokens/s, peak memory):", "",
             *table(["T", *TRAINERS], _pivot(data["train"], ["T"], TRAINERS)), "",
             "Decode step after a context (ms/step, tokens/s):", "",
             *table(["context", "batch", *DECODERS],
                    _pivot(data["decode"], ["context", "batch"], DECODERS))]
    return lines


def _setup(plan: cells.Plan, counts: dict[str, Any]) -> str:
    c = plan.config
    return (f"RetNet d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads (K "
            f"{c.key_head_dim}, V {c.value_head_dim}), vocab {c.vocab_size}, chunk "
            f"{plan.chunk_size}; Llama matched: {counts}. bf16 weights and autocast, eager, no "
            f"CUDA graphs; {plan.tokens_per_step} tokens per training step (batch = tokens / "
            f"T); decode states and caches filled with random values.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gpu.json",
                   help="the JSON results; the Markdown summary goes beside it (.md)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: the plumbing only")
    p.add_argument("--budget-s", type=float, default=280.0,
                   help="cells that would start after this many seconds are skipped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    plan = cells.Plan.quick(device) if args.quick else cells.Plan.full(device)
    run = Run(Path(args.out), args.budget_s, device)
    try:
        counts: dict[str, Any] = cells.parameter_counts(plan.config)
    except ImportError as err:
        counts = {"error": f"transformers is not installed ({err.name})"}
    run.data = {"meta": {"command": " ".join(["python", *sys.argv]) if argv is None
                         else "main(" + " ".join(argv) + ")",
                         "machine": machine_facts(device), "config": plan.config.to_dict(),
                         "parameters": counts, "budget_s": args.budget_s, "elapsed_s": 0.0,
                         "setup": _setup(plan, counts), "quick": args.quick},
                **{section: [] for section in SECTIONS}}
    for cell in plan_cells(plan, cells.Models(plan)):
        run.record(cell)
    run.data["meta"]["finished"] = True
    run.write()
    print("\n".join(summary(run.data)))
    return run.data


if __name__ == "__main__":
    main()
