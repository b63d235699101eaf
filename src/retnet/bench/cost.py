"""`retnet bench`: decode, memory, prefill and training cost of RetNet against a matched
Transformer (transformers' Llama) and other RetNet code, plus the machine's own limits.

Candidates are interleaved inside each cell (repeat r runs every backend once) so a core
that is descheduled for a while slows all of them alike; ours also runs with every fast path
off (the PyTorch reference, "-reference" results) beside each of its fast cells. Medians and
min–max are kept, with every raw timing, in a JSON file; a Markdown report and PNG plots are
written beside it.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from retnet.bench.backends import Backend, build_backends
from retnet.bench.llamacpp import check_llamacpp_python, run_llamacpp
from retnet.bench.machine import (
    CopyProbe,
    best_limits,
    bf16_dot_products,
    describe_machine,
    measure_limits,
)
from retnet.bench.measure import BENCH_FORM, cap_memory, summary, timed
from retnet.bench.peers import (
    WHY_NOT_HERE,
    check_torchscale_python,
    run_torchscale,
    torchscale_job,
)
from retnet.memory import PeakMemory, keep_freed_memory, reset_peak, rss_mib
from retnet.model import RetNetConfig
from retnet.options import opt

PHASES = ("decode", "prefill", "train", "llamacpp")  # llamacpp: with --llamacpp-python
KV_LIMIT = 8 * 2**30  # decode cells whose KV cache would exceed this are skipped
COMMITTED = "benchmarks/results/cost"  # the full run's results, kept in the repository
QUICK_OUT = "bench-results/quick"  # a smoke run's: beside them, never over them


@dataclass
class BenchConfig:
    """Run options of `retnet bench`."""

    preset: str = opt("small", "model size (the Transformer is matched to it)")
    contexts: list[int] = opt(help="decode: tokens of context before the timed steps",
                              factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    batches: list[int] = opt(help="decode: sequences per step", factory=lambda: [1, 8, 32])
    prefill_lengths: list[int] = opt(help="prefill: prompt lengths",
                                     factory=lambda: [2048, 8192, 16384])
    scaling_lengths: list[int] = opt(help="prefill at --scaling-batch sequences (ours, float32): "
                                     "prompt lengths whose times show the growth",
                                     factory=lambda: [4096, 16384])
    scaling_batch: int = opt(8, "sequences per prefill in the scaling cells")
    train_lengths: list[int] = opt(help="training: sequence lengths",
                                   factory=lambda: [512, 2048, 8192])
    train_tokens: int = opt(8192, "tokens per training step, the same for every length")
    repeats: int = opt(5, "timed repeats per cell (decode: steps per repeat = 4)")
    out: str | None = opt(None, "folder for results.json, report.md and plots (default: "
                          f"{COMMITTED}, or {QUICK_OUT} with --quick)")
    quick: bool = opt(False, "tiny sizes, one repeat: a smoke run")
    memory_cap_gib: float = opt(20.0, "an allocation beyond this is recorded as out of memory")
    only: list[str] = opt(help="run only these phases (decode, prefill, train, llamacpp); "
                          "default: all (llamacpp where --llamacpp-python is given)",
                          factory=list, choices=PHASES)
    torchscale_python: str = opt(
        "", "an interpreter whose environment has torchscale (it cannot import beside this "
        "torch): its RetNetDecoder is then measured in a separate process after the others",
        metavar="PATH")
    llamacpp_python: str = opt(
        "", "an interpreter whose environment has llama-cpp-python and llama.cpp's GGUF "
        "converter (docs/benchmarks.md): the matched Llama in GGUF (F32, Q8_0) is then timed "
        "at batch 1 in rounds alternated with ours (float32, int8)", metavar="PATH")
    llamacpp_contexts: list[int] = opt(help="llama.cpp phase: tokens of context before the "
                                       "timed decode steps; the longest is also prefilled",
                                       factory=lambda: [512, 2048, 8192])
    no_reference: bool = opt(False, "skip the cells of ours with every fast path off (the "
                             "PyTorch reference, timed beside each decode format, the float32 "
                             "prefill and the chunkwise training step)")

    def __post_init__(self) -> None:
        # A smoke run from the repository root must not replace the committed results.
        if self.out is None:
            self.out = QUICK_OUT if self.quick else COMMITTED
        if self.quick:
            self.preset, self.repeats = "tiny", 1
            self.contexts, self.batches = [64, 256], [1, 4]
            self.prefill_lengths, self.train_lengths, self.train_tokens = [128], [64], 256
            self.scaling_lengths, self.scaling_batch = [64, 256], 2
            self.llamacpp_contexts = [64, 256]


def _allocator() -> str:
    from retnet.memory import MMAP_THRESHOLD

    if keep_freed_memory():
        return ("glibc malloc; decode: mmap threshold 32 MiB (glibc's own ceiling: the KV "
                "caches and states of successive cells are handed back); prefill and training: "
                f"{MMAP_THRESHOLD >> 20} MiB (retnet.memory, as the retnet command runs), "
                "trimmed before each measurement; the same for every backend, the torchscale "
                "worker included")
    return "glibc malloc defaults"


def _oom(err: BaseException) -> dict[str, str]:
    return {"status": "out of memory", "error": str(err).splitlines()[0][:200]}


def _set_up_decode(b: Backend, batch: int, context: int) -> tuple[Callable[[], None] | None,
                                                                  dict]:
    """Backend b's decode step after `context` tokens, warmed up, and its result entry (with
    the resident memory its cache or state added); no step if it does not fit."""
    if b.memory_bytes(batch, context) > KV_LIMIT:
        return None, {"status": "skipped: KV cache over 8 GiB"}
    reset_peak()  # collect and trim first: every backend starts from the same heap
    before = rss_mib()
    try:
        with torch.no_grad():
            step = b.decode_setup(batch, context)
            for _ in range(2):  # warm-up
                step()
    except (RuntimeError, MemoryError) as err:
        reset_peak()
        return None, _oom(err)
    return step, {"status": "ok", "rss_delta_mib": rss_mib() - before,
                  "memory_bytes": b.memory_bytes(batch, context)}


def _interleaved(steps: dict[str, Callable[[], None]], repeats: int,
                 probe: CopyProbe | None) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per step of each step function (4 steps per repeat), one repeat of each in
    turn, and with a probe, the bytes/s of two copies before each round (their best)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    rates = []
    with torch.no_grad():
        for _ in range(repeats):
            if probe is not None:
                rates.append(max(probe.rate(), probe.rate()))
            for name, step in steps.items():
                times[name].append(timed(lambda s=step: [s() for _ in range(4)]) / 4)
    return times, rates


def bench_decode(backends: list[Backend], cfg: BenchConfig, bar,
                 probe: CopyProbe | None = None) -> list[dict]:
    """Every (batch, context) cell: each backend's step after the context, interleaved; with
    a probe, the copy bandwidth beside the cell's rounds (its floor's denominator)."""
    rows = []
    for batch in cfg.batches:
        for context in cfg.contexts:
            steps, cell = {}, {"batch": batch, "context": context, "results": {}}
            for b in backends:
                if b.decode_setup is not None:
                    step, cell["results"][b.name] = _set_up_decode(b, batch, context)
                    if step is not None:
                        steps[b.name] = step
            times, rates = _interleaved(steps, cfg.repeats, probe)
            for name, ts in times.items():
                cell["results"][name] |= summary(ts)
            if rates:
                cell["copy_bytes_per_s"], cell["copy_rounds_bytes_per_s"] = max(rates), rates
            rows.append(cell)
            del steps
            bar.update(1)
    return rows


def bench_flatness(backends: list[Backend], cfg: BenchConfig, bar) -> list[dict]:
    """RetNet's step after the shortest and the longest context, interleaved round by round
    in one cell per batch: their ratio is flatness with the machine's drift between cells
    (minutes apart) taken out. Ours only: a KV cache's cost is meant to grow."""
    rows, lo, hi = [], min(cfg.contexts), max(cfg.contexts)
    ours = [b for b in backends if b.name.startswith("retnet") and b.decode_setup is not None
            and not b.reference]
    for batch in cfg.batches:
        steps, cell = {}, {"batch": batch, "contexts": [lo, hi], "results": {}}
        for b in ours:
            for context in (lo, hi):
                step, cell["results"][f"{b.name}@{context}"] = _set_up_decode(b, batch, context)
                if step is not None:
                    steps[f"{b.name}@{context}"] = step
        times, _ = _interleaved(steps, cfg.repeats, None)
        for key, ts in times.items():
            cell["results"][key] |= summary(ts)
        rows.append(cell)
        del steps
        bar.update(1)
    return rows


def bench_prefill(backends: list[Backend], cfg: BenchConfig, vocab: int, bar) -> list[dict]:
    rows = []
    for length in cfg.prefill_lengths:
        ids = torch.randint(0, vocab, (1, length))  # [1, T]
        cell = {"T": length, "results": {}}
        runnable = [b for b in backends if b.prefill is not None]
        times: dict[str, list[float]] = {b.name: [] for b in runnable}
        for _ in range(max(1, cfg.repeats // 2)):
            for b in runnable:
                times[b.name].append(timed(lambda b=b, ids=ids: b.prefill(ids)))
                reset_peak()  # collect and trim: the next backend starts from the same heap
        for name, ts in times.items():
            cell["results"][name] = {"status": "ok", **summary(ts)}
        rows.append(cell)
        bar.update(1)
    return rows


def bench_prefill_scaling(backends: list[Backend], cfg: BenchConfig, vocab: int, bar
                          ) -> list[dict]:
    """Our float32 prefill of --scaling-batch sequences at each scaling length, the lengths
    alternated round by round (the growth from the shortest to the longest is the figure:
    linear is the longest / the shortest length)."""
    if not cfg.scaling_lengths:
        return []
    ours = next(b for b in backends if b.name == "retnet")
    ids = {t: torch.randint(0, vocab, (cfg.scaling_batch, t)) for t in cfg.scaling_lengths}
    times: dict[int, list[float]] = {t: [] for t in cfg.scaling_lengths}
    for _ in range(max(1, cfg.repeats // 2)):
        for t, x in ids.items():
            times[t].append(timed(lambda x=x: ours.prefill(x)))
            reset_peak()
    bar.update(1)
    return [{"batch": cfg.scaling_batch, "T": t, "results": {ours.name: {"status": "ok",
                                                                        **summary(ts)}}}
            for t, ts in times.items()]


def bench_train(backends: list[Backend], cfg: BenchConfig, vocab: int, bar) -> list[dict]:
    rows = []
    for length in cfg.train_lengths:
        batch = max(1, cfg.train_tokens // length)
        ids = torch.randint(0, vocab, (batch, length + 1))  # [B, T + 1]
        cell = {"T": length, "batch": batch, "results": {}}
        runs = [(b, m) for b in backends if b.train_step is not None for m in b.train_modes]
        times: dict[str, list[float]] = {}
        for r in range(max(1, cfg.repeats // 2) + 1):  # the first round is the warm-up
            for b, mode in runs:
                key = b.train_label(mode)
                if cell["results"].get(key, {}).get("status", "ok") != "ok":
                    continue
                meter = PeakMemory("cpu")
                try:
                    took = timed(lambda b=b, mode=mode, ids=ids: b.train_step(ids, mode))
                except (RuntimeError, MemoryError) as err:
                    cell["results"][key] = _oom(err)
                    continue
                entry = cell["results"].setdefault(key, {"status": "ok", "peak_mib": 0.0})
                entry["peak_mib"] = max(entry["peak_mib"], meter.mib())
                if r:
                    times.setdefault(key, []).append(took)
        for key, ts in times.items():
            cell["results"][key] |= summary(ts) | {
                "tokens_per_s": batch * length / statistics.median(ts)}
        rows.append(cell)
        bar.update(1)
    return rows


def _meta(cfg: BenchConfig, config: RetNetConfig, backends: list[Backend],
          skipped: dict[str, str], weight_bytes: int) -> dict[str, Any]:
    """What was run, where and how: the results file's "meta"."""
    return {**describe_machine(), "command": "retnet bench " + " ".join(sys.argv[2:]),
            "bench_config": asdict(cfg), "retnet_config": config.to_dict(),
            "dtype": "float32 (retnet-bfloat16: bf16 weights; retnet-int8: weight-only int8; "
                     "float32 state and activations in both; *-reference: the same with every "
                     "fast path off)",
            "threads": torch.get_num_threads(), "skipped": skipped,
            "allocator": _allocator(), "chunk_size": BENCH_FORM.chunk_size,
            "backends": {b.name: {"config": b.config, "non_embedding": b.non_embedding,
                                  "weight_bytes": b.weight_bytes} for b in backends},
            "weight_bytes": weight_bytes}


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """What exists before the cells (the imports, the models) moved out of the garbage
    collector's sight while they run: reset_peak's collection before every measurement then
    walks only what the cells left, where a full one walks ~400k objects (a quick run makes
    70 of them, each a second on a busy core)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything and write OUT/results.json, OUT/report.md and OUT/*.png."""
    cap_memory(cfg.memory_cap_gib)
    config = RetNetConfig.from_preset(cfg.preset)
    if cfg.torchscale_python:
        check_torchscale_python(cfg.torchscale_python)
    if cfg.only == ["llamacpp"] and not cfg.llamacpp_python:
        raise ValueError("--only llamacpp needs --llamacpp-python PATH (docs/benchmarks.md, "
                         "\"llama.cpp as a peer\")")
    converter = check_llamacpp_python(cfg.llamacpp_python) if cfg.llamacpp_python else None
    skipped: dict[str, str] = {}
    phases = cfg.only or list(PHASES)
    if not cfg.llamacpp_python:
        phases = [p for p in phases if p != "llamacpp"]
        skipped["llama.cpp"] = ("not run: pass --llamacpp-python PATH (an interpreter with "
                                "llama-cpp-python, docs/benchmarks.md) to measure it")
    reference = not cfg.no_reference and bool({"decode", "prefill", "train"} & set(phases))
    if cfg.no_reference:
        skipped["retnet-*-reference"] = "not run: --no-reference"
    # a quick run keeps the bf16 cells everywhere: at its tiny sizes they cost nothing
    backends = build_backends(config, skipped, bf16_compute=bf16_dot_products() or cfg.quick,
                              reference=reference)
    if not cfg.torchscale_python:
        skipped["torchscale"] = (f"not run: {WHY_NOT_HERE}; pass --torchscale-python PATH "
                                 "(an interpreter with torchscale) to measure it in a separate "
                                 "process")
    total = 2 + sum(n for phase, n in (("decode", len(cfg.batches) * (len(cfg.contexts) + 1)),
                                       ("prefill", len(cfg.prefill_lengths)
                                        + bool(cfg.scaling_lengths)),
                                       ("train", len(cfg.train_lengths)),
                                       ("llamacpp", len(cfg.llamacpp_contexts) + 2))
                    if phase in phases)
    with _frozen_heap(), tqdm(total=total, desc="bench", unit="cell") as bar:
        weight_bytes = backends[0].weight_bytes
        # the llama.cpp phase alone uses no floor: the small measurement serves its report
        small_limits = cfg.quick or phases == ["llamacpp"]
        limits = measure_limits(weight_bytes, quick=small_limits)
        bar.update(1)
        results = {"meta": _meta(cfg, config, backends, skipped, weight_bytes),
                   "limits": limits, "decode": [], "flatness": [], "prefill": [],
                   "prefill_scaling": [], "train": []}
        keep_freed_memory(False)  # decode: caches of up to 8 GiB come and go between cells
        if "decode" in phases:
            results["decode"] = bench_decode(backends, cfg, bar, CopyProbe(weight_bytes))
            results["flatness"] = bench_flatness(backends, cfg, bar)
        keep_freed_memory(True)
        if "prefill" in phases:
            results["prefill"] = bench_prefill(backends, cfg, config.vocab_size, bar)
            results["prefill_scaling"] = bench_prefill_scaling(backends, cfg,
                                                               config.vocab_size, bar)
        if "train" in phases:
            results["train"] = bench_train(backends, cfg, config.vocab_size, bar)
        if "llamacpp" in phases:
            run_llamacpp(cfg.llamacpp_python, converter, config, backends,
                         cfg.llamacpp_contexts, cfg.repeats, results, bar)
        results["limits"] = best_limits(limits, measure_limits(weight_bytes, quick=small_limits))
        bar.update(1)
    if cfg.torchscale_python:
        job = torchscale_job(config, cfg, torch.get_num_threads(), KV_LIMIT)
        run_torchscale(cfg.torchscale_python, job, results)
    from retnet.bench.report import fast_vs_reference, write_report

    results["fast_vs_reference"] = fast_vs_reference(results)
    write_report(results, Path(cfg.out))
    return results


def command(cfg: BenchConfig) -> int:
    """`retnet bench`: run, write the results, report and plots, and say where they are."""
    run(cfg)
    print(f"wrote {cfg.out}/results.json, report.md and plots")
    return 0
