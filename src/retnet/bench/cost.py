"""`retnet bench`: decode, memory, prefill and training cost of RetNet against a matched
Transformer (transformers' Llama) and other RetNet code, plus the machine's own limits.

Candidates are interleaved inside each cell (repeat r runs every backend once) so a core
that is descheduled for a while slows all of them alike; medians and min–max are kept, with
every raw timing, in a JSON file; a Markdown report and PNG plots are written beside it.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from retnet.bench.backends import Backend, build_backends
from retnet.bench.machine import describe_machine, measure_limits
from retnet.bench.peers import (
    WHY_NOT_HERE,
    check_torchscale_python,
    run_torchscale,
    torchscale_job,
)
from retnet.memory import keep_freed_memory, trim
from retnet.model import RetNetConfig

KV_LIMIT = 8 * 2**30  # decode cells whose KV cache would exceed this are skipped


@dataclass
class BenchConfig:
    """Run options of `retnet bench`."""

    preset: str = "small"  # model size (the Transformer is matched to it)
    contexts: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    prefill_lengths: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    train_lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    train_tokens: int = 8192  # tokens per training step, the same for every length
    repeats: int = 5  # timed repeats per cell (decode: steps per repeat = 4)
    out: str = "benchmarks/results/cost"
    quick: bool = False  # tiny sizes, one repeat: a smoke run
    memory_cap_gib: float = 20.0  # an allocation beyond this is recorded as out of memory
    # An interpreter whose environment has torchscale (it cannot import beside this torch):
    # its RetNetDecoder is then measured in a separate process after the others.
    torchscale_python: str = ""

    def __post_init__(self) -> None:
        if self.quick:
            self.preset, self.repeats = "tiny", 1
            self.contexts, self.batches = [64, 256], [1, 4]
            self.prefill_lengths, self.train_lengths, self.train_tokens = [128], [64], 256


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "raw_s": times}


def _allocator() -> str:
    from retnet.memory import MMAP_THRESHOLD, keep_freed_memory

    if keep_freed_memory():
        return ("glibc malloc; decode: mmap threshold 32 MiB (glibc's own ceiling: the KV "
                "caches and states of successive cells are handed back); prefill and training: "
                f"{MMAP_THRESHOLD >> 20} MiB (retnet.memory, as the retnet command runs), "
                "trimmed before each measurement; the same for every backend, the torchscale "
                "worker included")
    return "glibc malloc defaults"


def _trim() -> None:
    gc.collect()
    trim()


def _rss_mib(field_name: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def bench_decode(backends: list[Backend], cfg: BenchConfig, bar) -> list[dict]:
    rows = []
    for batch in cfg.batches:
        for context in cfg.contexts:
            steps, cell = {}, {"batch": batch, "context": context, "results": {}}
            for b in backends:
                if b.decode_setup is None:
                    continue
                if b.memory_bytes(batch, context) > KV_LIMIT:
                    cell["results"][b.name] = {"status": "skipped: KV cache over 8 GiB"}
                    continue
                _trim()
                before = _rss_mib()
                try:
                    with torch.no_grad():
                        steps[b.name] = b.decode_setup(batch, context)
                        for _ in range(2):  # warm-up
                            steps[b.name]()
                except (RuntimeError, MemoryError) as err:
                    steps.pop(b.name, None)
                    cell["results"][b.name] = {"status": "out of memory",
                                               "error": str(err).splitlines()[0][:200]}
                    _trim()
                    continue
                cell["results"][b.name] = {"status": "ok", "rss_delta_mib": _rss_mib() - before,
                                           "memory_bytes": b.memory_bytes(batch, context)}
            times: dict[str, list[float]] = {name: [] for name in steps}
            with torch.no_grad():
                for _ in range(cfg.repeats):
                    for name, step in steps.items():
                        times[name].append(_timed(lambda s=step: [s() for _ in range(4)]) / 4)
            for name, ts in times.items():
                cell["results"][name] |= _summary(ts)
            rows.append(cell)
            del steps
            bar.update(1)
    return rows


def bench_prefill(backends: list[Backend], cfg: BenchConfig, vocab: int, bar) -> list[dict]:
    rows = []
    for length in cfg.prefill_lengths:
        ids = torch.randint(0, vocab, (1, length))
        cell = {"T": length, "results": {}}
        runnable = [b for b in backends if b.prefill is not None]
        times: dict[str, list[float]] = {b.name: [] for b in runnable}
        for _ in range(max(1, cfg.repeats // 2)):
            for b in runnable:
                times[b.name].append(_timed(lambda b=b, ids=ids: b.prefill(ids)))
                _trim()
        for name, ts in times.items():
            cell["results"][name] = {"status": "ok", **_summary(ts)}
        rows.append(cell)
        bar.update(1)
    return rows


def bench_train(backends: list[Backend], cfg: BenchConfig, vocab: int, bar) -> list[dict]:
    rows = []
    for length in cfg.train_lengths:
        batch = max(1, cfg.train_tokens // length)
        ids = torch.randint(0, vocab, (batch, length + 1))
        cell = {"T": length, "batch": batch, "results": {}}
        runs = [(b, m) for b in backends if b.train_step is not None for m in b.train_modes]
        times: dict[str, list[float]] = {}
        for r in range(max(1, cfg.repeats // 2) + 1):  # the first round is the warm-up
            for b, mode in runs:
                key = b.train_label(mode)
                if cell["results"].get(key, {}).get("status", "ok") != "ok":
                    continue
                _trim()
                _reset_peak()
                base = _rss_mib()
                try:
                    took = _timed(lambda b=b, mode=mode, ids=ids: b.train_step(ids, mode))
                except (RuntimeError, MemoryError) as err:
                    cell["results"][key] = {"status": "out of memory",
                                            "error": str(err).splitlines()[0][:200]}
                    continue
                peak = _rss_mib("VmHWM") - base
                entry = cell["results"].setdefault(key, {"status": "ok", "peak_mib": 0.0})
                entry["peak_mib"] = max(entry["peak_mib"], peak)
                if r:
                    times.setdefault(key, []).append(took)
        for key, ts in times.items():
            cell["results"][key] |= _summary(ts) | {
                "tokens_per_s": batch * length / statistics.median(ts)}
        rows.append(cell)
        bar.update(1)
    return rows


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything and write OUT/results.json, OUT/report.md and OUT/*.png."""
    cap = int(cfg.memory_cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    config = RetNetConfig.from_preset(cfg.preset)
    if cfg.torchscale_python:
        check_torchscale_python(cfg.torchscale_python)
    skipped: dict[str, str] = {}
    backends = build_backends(config, skipped)
    if not cfg.torchscale_python:
        skipped["torchscale"] = (f"not run: {WHY_NOT_HERE}; pass --torchscale-python PATH "
                                 "(an interpreter with torchscale) to measure it in a separate "
                                 "process")
    total = (len(cfg.batches) * len(cfg.contexts) + len(cfg.prefill_lengths)
             + len(cfg.train_lengths) + 1)
    with tqdm(total=total, desc="bench", unit="cell") as bar:
        weight_bytes = sum(p.numel() * 4 for p in backends[0].model.parameters())
        limits = measure_limits(weight_bytes, quick=cfg.quick)
        bar.update(1)
        results = {
            "meta": {**describe_machine(), "command": "retnet bench " + " ".join(sys.argv[2:]),
                     "bench_config": asdict(cfg), "retnet_config": config.to_dict(),
                     "dtype": "float32 (retnet-bfloat16: bf16 weights, float32 state)",
                     "threads": torch.get_num_threads(), "skipped": skipped,
                     "allocator": _allocator(),
                     "backends": {b.name: {"config": b.config, "non_embedding": b.non_embedding}
                                  for b in backends},
                     "weight_bytes": weight_bytes},
            "limits": limits,
        }
        keep_freed_memory(False)  # decode: caches of up to 8 GiB come and go between cells
        results["decode"] = bench_decode(backends, cfg, bar)
        keep_freed_memory(True)
        results["prefill"] = bench_prefill(backends, cfg, config.vocab_size, bar)
        results["train"] = bench_train(backends, cfg, config.vocab_size, bar)
    if cfg.torchscale_python:
        job = torchscale_job(config, cfg, torch.get_num_threads(), KV_LIMIT)
        run_torchscale(cfg.torchscale_python, job, results)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from retnet.bench.report import write_report

    write_report(results, out)
    return results
