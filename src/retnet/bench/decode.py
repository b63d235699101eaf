"""Per-token decode latency and process memory after contexts of 1k, 4k and 16k tokens.

The model runs as `retnet generate` runs it: weights in the inference layout
(retnet.modules.layout), the new state written into the previous step's buffers.
Each (batch, context) cell runs in a fresh process: a real chunkwise prefill of the context
(last position's logits only), then the peak-RSS counter is reset and freed heap returned
(retnet.memory.reset_peak), then recurrent decode steps are timed. A decode step is one token
per sequence through the whole model including the LM head and the greedy choice.

    python benchmarks/decode.py [--preset small] [--contexts 1024 4096 16384] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from retnet.bench import measure
from retnet.bench.machine import header

WARMUP_STEPS = 4


def run_cell(preset: str, batch: int, context: int, steps: int) -> dict:
    """One (batch, context) cell, in this process."""
    import torch

    from retnet.generation import StepBuffers, prefill
    from retnet.memory import reset_peak, rss_mib
    from retnet.model import RetNetConfig, RetNetLM, use_inference_layout

    torch.manual_seed(0)
    model = use_inference_layout(RetNetLM(RetNetConfig.from_preset(preset)).eval())
    ids = torch.randint(0, model.config.vocab_size, (batch, context))  # [B, T]
    start = time.perf_counter()
    logits, state = prefill(model, ids, form=measure.BENCH_FORM)  # logits [B, vocab]
    prefill_s = time.perf_counter() - start
    del ids
    reset_peak()  # the decode peak below is measured from the state's resident set
    buffers = StepBuffers()  # as generate() does: two state buffers take turns

    def step() -> None:
        nonlocal logits, state
        logits, state = buffers.step(model, logits.argmax(-1), state)

    with torch.no_grad():
        times = measure.repeat_timed(step, steps, warmup=WARMUP_STEPS)
    return {"batch": batch, "context": context, "prefill_s": prefill_s,
            **measure.summary(times),
            "decode_peak_rss_mib": rss_mib("VmHWM"), "state_mib": state.nbytes / 2**20,
            "threads": torch.get_num_threads()}


COLUMNS = ("batch", "context", "ms / decode step, median (min–max)", "tokens/s",
           "decode peak RSS MiB", "state MiB")


def report(rows: list[dict], preset: str, batches: list[int]) -> list[str]:
    table_rows = ([r["batch"], r["context"], measure.spread(r, scale=1e3),
                   f"{r['batch'] / r['median_s']:.0f}", f"{r['decode_peak_rss_mib']:.0f}",
                   f"{r['state_mib']:.1f}"] for r in rows)
    lines = [header("float32", f"preset {preset}"), "",
             *measure.table(COLUMNS, table_rows)]
    lines.append("")
    for b in batches:
        cells = {r["context"]: r for r in rows if r["batch"] == b}
        lo, hi = cells[min(cells)], cells[max(cells)]
        lines.append(f"batch {b}: time ratio {hi['context']}/{lo['context']} = "
                     f"{hi['median_s'] / lo['median_s']:.3f}, memory ratio "
                     f"{hi['decode_peak_rss_mib'] / lo['decode_peak_rss_mib']:.3f}")
    return lines


def parser() -> argparse.ArgumentParser:
    p = measure.script_parser(__doc__, cell=("BATCH", "CONTEXT"))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    return p


def cell(args: argparse.Namespace) -> dict:
    """Inside a cell's own process: its measurement."""
    batch, context = map(int, args.cell)
    return run_cell(args.preset, batch, context, args.steps)


def sweep(args: argparse.Namespace) -> None:
    """Every (batch, context) cell in its own process; decode.json and decode.md."""
    cells = [(b, c) for b in args.batches for c in args.contexts]
    common = ["--preset", args.preset, "--steps", str(args.steps)]
    rows = measure.spawn_cells(__spec__.name, cells, common, desc="decode")
    for (b, c), row in zip(cells, rows):
        status = row.pop("status")
        if status != "ok":  # a decode figure needs every cell: stop, saying which one failed
            raise SystemExit(f"decode cell batch {b}, context {c}: {status}: {row['error']}")
    measure.write_results(args.out, "decode", rows, report(rows, args.preset, args.batches))


def main(argv: Sequence[str] | None = None) -> None:
    measure.run_script(parser(), argv, cell, sweep)


if __name__ == "__main__":
    main()
