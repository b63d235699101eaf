"""Per-token decode latency and process memory after contexts of 1k, 4k and 16k tokens.

The model runs as `retnet generate` runs it: weights in the inference layout
(retnet.model.layout), the new state written into the previous step's buffers.
Each (batch, context) cell runs in a fresh process: a real chunkwise prefill of the context
(last position's logits only), then the peak-RSS counter is reset (/proc/self/clear_refs) and
freed heap returned (malloc_trim), then recurrent decode steps are timed. A decode step is one
token per sequence through the whole model including the LM head and the greedy choice.

    python benchmarks/decode.py [--preset small] [--contexts 1024 4096 16384] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_cell(preset: str, batch: int, context: int, steps: int) -> dict:
    import torch

    from retnet import RetNetConfig, RetNetLM
    from retnet.generation import decode_one, prefill
    from retnet.model.layout import use_inference_layout

    torch.manual_seed(0)
    model = use_inference_layout(RetNetLM(RetNetConfig.from_preset(preset)).eval())
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    start = time.perf_counter()
    logits, state = prefill(model, ids, chunk_size=128)
    prefill_s = time.perf_counter() - start
    del ids
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, spare = [], state.empty_like()
    with torch.no_grad():
        for i in range(steps + 4):  # 4 warm-up steps
            start = time.perf_counter()
            token = logits.argmax(-1)
            # as generate() does: two state buffers take turns
            (logits, state), spare = decode_one(model, token, state, out=spare), state
            if i >= 4:
                times.append(time.perf_counter() - start)
    return {"batch": batch, "context": context, "prefill_s": prefill_s,
            "ms_per_step": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times), "decode_peak_rss_mib": _rss_mib("VmHWM"),
            "state_mib": state.nbytes / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--cell", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.preset, args.cell[0], args.cell[1], args.steps)))
        return
    import torch
    from tqdm import tqdm

    rows = []
    for b in tqdm(args.batches, desc="batches"):
        for c in tqdm(args.contexts, desc=f"batch {b}", leave=False):
            cmd = [sys.executable, __file__, "--cell", str(b), str(c), "--preset", args.preset,
                   "--steps", str(args.steps)]
            rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                  check=True).stdout))
    lines = [f"`python {' '.join(sys.argv)}` — {platform.machine()}, torch {torch.__version__}, "
             f"{rows[0]['threads']} threads, float32, preset {args.preset}", "",
             "| batch | context | ms / decode step, median (min–max) | tokens/s | "
             "decode peak RSS MiB | state MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['ms_per_step']:.2f} "
                     f"({r['min_ms']:.2f}–{r['max_ms']:.2f}) | "
                     f"{r['batch'] * 1e3 / r['ms_per_step']:.0f} | "
                     f"{r['decode_peak_rss_mib']:.0f} | {r['state_mib']:.1f} |")
    lines.append("")
    for b in args.batches:
        cells = {r["context"]: r for r in rows if r["batch"] == b}
        lo, hi = cells[min(cells)], cells[max(cells)]
        lines.append(f"batch {b}: time ratio {hi['context']}/{lo['context']} = "
                     f"{hi['ms_per_step'] / lo['ms_per_step']:.3f}, memory ratio "
                     f"{hi['decode_peak_rss_mib'] / lo['decode_peak_rss_mib']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(rows, indent=1))
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
