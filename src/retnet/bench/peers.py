"""Peers that cannot run in the benchmark's own process: microsoft/torchscale, measured by
`torchscale_peer.py` under another interpreter and merged into the results as `torchscale`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from retnet.bench.measure import BENCH_FORM
from retnet.memory import keep_freed_memory
from retnet.model import RetNetConfig

WORKER = Path(__file__).with_name("torchscale_peer.py")
WHY_NOT_HERE = ("torchscale needs timm, hence torchvision, which does not import beside the CPU "
                "torch 2.13.0")


def check_torchscale_python(python: str) -> None:
    """Fail fast (before a long run) unless `python` can import torch and torchscale."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ValueError(f"--torchscale-python {python}: not an executable file; give the "
                         "interpreter of an environment with torchscale (see docs/benchmarks.md)")
    probe = subprocess.run([python, "-c", "import torch, torchscale.architecture.retnet"],
                           capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"--torchscale-python {python} cannot import torchscale ({last}); "
                         "install it there: pip install torch==2.14.1 torchvision==0.29.1 "
                         "torchscale==0.3.0")


def torchscale_job(config: RetNetConfig, cfg: Any, threads: int, kv_limit: int) -> dict:
    """The worker's job. torchscale's FFN is a GLU (three d × f matrices): f is chosen so its
    FFN has the parameters of ours (two d × ffn_dim matrices); retention is the same 8d².
    Phases left out by --only have no cells."""
    phases = cfg.only or ("decode", "prefill", "train")
    runs = {phase: phase in phases for phase in ("decode", "prefill", "train")}
    return {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "value_dim": config.value_dim, "ffn_dim": round(2 * config.ffn_dim / 3),
            "vocab_size": config.vocab_size, "chunk_size": BENCH_FORM.chunk_size,
            "contexts": cfg.contexts, "batches": cfg.batches if runs["decode"] else [],
            "prefill_lengths": cfg.prefill_lengths if runs["prefill"] else [],
            "train_lengths": cfg.train_lengths if runs["train"] else [],
            "train_tokens": cfg.train_tokens, "repeats": cfg.repeats, "threads": threads,
            "memory_cap_gib": cfg.memory_cap_gib, "kv_limit": kv_limit,
            "keep_freed_memory": keep_freed_memory()}


def run_torchscale(python: str, job: dict, results: dict) -> None:
    """Run the worker and merge its cells into `results` (or record why it was skipped)."""
    meta = results["meta"]
    # -I: the worker's folder is not put on sys.path, where retnet/bench/profile.py would
    # shadow the standard library's profile (torch._dynamo imports cProfile, which needs it)
    proc = subprocess.run([python, "-I", str(WORKER), json.dumps(job)], stdout=subprocess.PIPE,
                          text=True)  # stderr (its progress) goes to the terminal
    if proc.returncode:
        meta["skipped"]["torchscale"] = (f"the worker under {python} failed with exit code "
                                         f"{proc.returncode} (its error is in the run's log)")
        return
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    meta["backends"]["torchscale"] = {
        "config": data["config"], "non_embedding": data["non_embedding"],
        "process": (f"separate process after the others (not interleaved): {python}, "
                    f"threads {data['threads']}, " + ", ".join(
                        f"{k} {v}" for k, v in data["versions"].items()))}
    decode = {(c["batch"], c["context"]): c for c in results["decode"]}
    for row in data["decode"]:
        decode[(row["batch"], row["context"])]["results"]["torchscale"] = row["result"]
    prefill = {c["T"]: c for c in results["prefill"]}
    for row in data["prefill"]:
        prefill[row["T"]]["results"]["torchscale"] = row["result"]
    train = {c["T"]: c for c in results["train"]}
    for row in data["train"]:
        train[row["T"]]["results"].update(row["results"])
