"""Native LoRA fine-tuning against full fine-tuning: training tokens/s, peak memory and
optimiser-state bytes at one preset, each run in its own process (so that peak RSS is its
own), the two alternated for several rounds, medians reported.

    python benchmarks/finetune.py [--preset small] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from retnet.bench.machine import describe_machine, header
from retnet.bench.measure import script_parser, write_results
from retnet.memory import keep_freed_memory
from retnet.model import RetNetConfig, RetNetLM
from retnet.modules.lora import add_lora
from retnet.train.step import adamw, train_step

MODES = ("full", "lora")
# LoRA as `retnet train --lora-rank 8 --lora-alpha 16 --lora-targets q,k,v,g,o,ffn` runs it.
RANK, ALPHA, TARGETS = 8, 16.0, ("q", "k", "v", "g", "o", "ffn")


def _rss_mib() -> float:
    """Current resident memory (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cell(mode: str, preset: str, batch: int, seq_len: int, steps: int) -> dict:
    """One process's measurement: `steps` timed optimiser steps after one warm-up step, with
    the allocator as `retnet train` sets it (freed blocks kept for reuse: retnet.memory)."""
    keep_freed_memory()
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset(preset)).train()
    if mode == "lora":
        add_lora(model, RANK, ALPHA, TARGETS)
    opt = adamw(model, 1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    loss_of = lambda x, t: model(x, mode="chunkwise", targets=t).loss  # noqa: E731
    before = _rss_mib()  # the weights (and the interpreter): what training adds is above it
    train_step(model, opt, [ids], 1e-4, loss_of=loss_of)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, [ids], 1e-4, loss_of=loss_of)
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = sum(t.numel() * t.element_size() for s in opt.state.values()
                for t in s.values() if torch.is_tensor(t))
    return {"tokens_per_s": batch * seq_len / seconds, "step_s": seconds,
            "peak_rss_mib": peak, "peak_above_weights_mib": peak - before,
            "optimizer_state_bytes": state,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters())}


def run_cell(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--cell", mode, "--preset", args.preset, "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(args, cells: dict[str, list[dict]]) -> tuple[dict, list[str]]:
    med = {m: {k: statistics.median(c[k] for c in cells[m]) for k in cells[m][0]}
           for m in MODES}
    full, lora = med["full"], med["lora"]
    ratios = {"tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
              "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
              "peak_above_weights": lora["peak_above_weights_mib"]
              / full["peak_above_weights_mib"]}
    machine = describe_machine()
    lines = [header(f"ISA {machine['backend']}", f"retnet {machine['versions']['retnet']}",
                    f"preset {args.preset}, batch {args.batch} × {args.seq_len} tokens",
                    f"{args.rounds} alternating rounds of one process per mode, "
                    f"{args.steps} steps each after a warm-up step, medians"), "",
             "| mode | trainable | tokens/s | step s | peak RSS MiB | peak above weights MiB "
             "| optimiser state MiB |", "|---|---|---|---|---|---|---|"]
    for m in MODES:
        c = med[m]
        lines.append(f"| {m} | {c['trainable']:,.0f} of {c['parameters']:,.0f} | "
                     f"{c['tokens_per_s']:.0f} | {c['step_s']:.2f} | {c['peak_rss_mib']:.0f} | "
                     f"{c['peak_above_weights_mib']:.0f} | "
                     f"{c['optimizer_state_bytes'] / 2**20:.2f} |")
    lines += ["", f"LoRA / full: tokens/s {ratios['tokens_per_s']:.2f}× (target ≥ 1.3×), "
              f"peak RSS {ratios['peak_rss']:.2f}× (target ≤ 0.7×), peak above the weights "
              f"{ratios['peak_above_weights']:.2f}×"]
    return {"machine": machine, "cells": cells, "medians": med,
            "ratios": ratios}, lines


def main() -> None:
    p = script_parser(__doc__, out="benchmarks/results/finetune")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cell", choices=MODES, help="(internal) measure one mode and print JSON")
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.preset, args.batch, args.seq_len, args.steps)))
        return
    cells: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:  # neither always runs first
            cells[mode].append(run_cell(mode, args))
    data, lines = report(args, cells)
    write_results(args.out, "finetune", data, lines)


if __name__ == "__main__":
    main()
