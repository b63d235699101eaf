"""Forward+backward time and peak memory of the parallel and chunkwise forms against T.

Each (form, T) cell runs in a fresh subprocess, so its peak resident memory is its own, under
an address-space cap so that an out-of-memory is recorded as a result instead of a crash.

    python benchmarks/forms.py [--preset small] [--lengths 512 2048 4096 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from retnet.bench.machine import header
from retnet.bench.measure import (
    BENCH_FORM,
    cap_memory,
    repeat_timed,
    run_script,
    script_parser,
    spawn_cells,
    spread,
    summary,
    table,
    write_results,
)
from retnet.ops import Form


def run_cell(preset: str, form: Form, length: int, repeats: int) -> dict:
    """One measurement, in this process: a batch of one sequence of `length` tokens."""
    import torch

    from retnet.memory import PeakMemory, rss_mib
    from retnet.model import RetNetConfig, RetNetLM, lm_loss

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset(preset))
    x = torch.randint(0, model.config.vocab_size, (1, length + 1))  # [1, T + 1]

    def step() -> None:
        lm_loss(model(x[:, :-1], mode=form).logits, x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    meter = PeakMemory("cpu")  # the resident set above the model's own
    times = repeat_timed(step, repeats, warmup=1)
    return {**summary(times), "peak_rss_mib": rss_mib("VmHWM"), "activation_mib": meter.mib(),
            "threads": torch.get_num_threads()}


COLUMNS = ("form", "T", "fwd+bwd median (min–max) s", "tokens/s", "peak RSS MiB",
           "above model MiB")


def _row(r: dict) -> list:
    if r["status"] != "ok":
        return [r["mode"], r["T"], r["status"], "", "", ""]
    return [r["mode"], r["T"], spread(r), f"{r['T'] / r['median_s']:.0f}",
            f"{r['peak_rss_mib']:.0f}", f"{r['activation_mib']:.0f}"]


def report(rows: list[dict], meta: dict) -> list[str]:
    return [header("float32", "batch 1", f"chunk {meta['chunk']}", f"preset {meta['preset']}"),
            "", *table(COLUMNS, map(_row, rows))]


def parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, cell=("MODE", "T"))
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    p.add_argument("--modes", nargs="+", default=["parallel", "chunkwise"])
    p.add_argument("--chunk", type=int, default=BENCH_FORM.chunk_size)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-cap-gib", type=float, default=16.0)
    return p


def cell(args: argparse.Namespace) -> dict:
    """Inside a cell's own process: its memory cap, then its measurement."""
    cap_memory(args.memory_cap_gib)
    form = Form(args.cell[0], chunk_size=args.chunk)
    return run_cell(args.preset, form, int(args.cell[1]), args.repeats)


def sweep(args: argparse.Namespace) -> None:
    """Every (form, T) cell in its own process; forms.json and forms.md."""
    from retnet.bench.machine import describe_machine

    common = ["--preset", args.preset, "--chunk", str(args.chunk), "--repeats",
              str(args.repeats), "--memory-cap-gib", str(args.memory_cap_gib)]
    cells = [(m, t) for t in args.lengths for m in args.modes]
    results = spawn_cells(__spec__.name, cells, common, desc="forms")
    rows = [{"mode": m, "T": t, **r} for (m, t), r in zip(cells, results)]
    meta = {"command": "python " + " ".join(sys.argv), **describe_machine(),
            "chunk": args.chunk, "preset": args.preset}
    write_results(args.out, "forms", {"meta": meta, "rows": rows}, report(rows, meta))


def main(argv: Sequence[str] | None = None) -> None:
    run_script(parser(), argv, cell, sweep)


if __name__ == "__main__":
    main()
