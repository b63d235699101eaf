"""Forward+backward time and peak memory of the parallel and chunkwise forms against T.

Each (form, T) cell runs in a fresh subprocess, so its peak resident memory is its own, under
an address-space cap so that an out-of-memory is recorded as a result instead of a crash.

    python benchmarks/forms.py [--preset small] [--lengths 512 2048 4096 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_cell(preset: str, mode: str, length: int, chunk: int, repeats: int) -> dict:
    """One measurement, in this process: a batch of one sequence of `length` tokens."""
    import torch

    from retnet import RetNetConfig, RetNetLM, lm_loss

    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset(preset))
    x = torch.randint(0, model.config.vocab_size, (1, length + 1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = model(x[:, :-1], mode=mode, chunk_size=chunk)
        lm_loss(out.logits, x[:, 1:]).backward()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_mib": peak / 1024, "activation_mib": (peak - base) / 1024,
            "threads": torch.get_num_threads()}


def spawn_cell(args: argparse.Namespace, mode: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", mode, str(length), "--preset", args.preset,
           "--chunk", str(args.chunk), "--repeats", str(args.repeats),
           "--memory-cap-gib", str(args.memory_cap_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return {"mode": mode, "T": length, "status": "ok", **json.loads(proc.stdout)}
    oom = "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower() or proc.returncode < 0
    return {"mode": mode, "T": length, "status": "out of memory" if oom else "failed",
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""}


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` — {meta['machine']}, torch {meta['torch']}, "
             f"{rows[0].get('threads', '?')} threads, float32, batch 1, chunk {meta['chunk']}",
             "", "| form | T | fwd+bwd median (min–max) s | tokens/s | peak RSS MiB | "
             "above model MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['T']} | {r['status']} | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['T']} | {r['median_s']:.2f} ({r['min_s']:.2f}–"
                     f"{r['max_s']:.2f}) | {r['T'] / r['median_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['activation_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    p.add_argument("--modes", nargs="+", default=["parallel", "chunkwise"])
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-cap-gib", type=float, default=16.0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--cell", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        cap = int(args.memory_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        cell = run_cell(args.preset, args.cell[0], int(args.cell[1]), args.chunk, args.repeats)
        print(json.dumps(cell))
        return
    import torch
    from tqdm import tqdm

    cells = [(m, t) for t in args.lengths for m in args.modes]
    rows = [spawn_cell(args, m, t) for m, t in tqdm(cells, desc="forms", unit="cell")]
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__, "chunk": args.chunk,
            "preset": args.preset, "cpus": len(__import__("os").sched_getaffinity(0))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forms.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = report(rows, meta)
    (out / "forms.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
