"""What the machine can do: measured float32 matmul FLOP/s and copy bandwidth over a buffer at
least the size of the weights (so that caches do not flatter it), and what it is."""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from retnet.bench.measure import repeat_timed
from retnet.device import cpu_name


def describe_machine() -> dict:
    import numpy

    from retnet import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "retnet": __version__}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "yet-another-retnet"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(), "backend": torch.backends.cpu.get_cpu_capability(),
            "bf16_dot_products": bf16_dot_products(), "versions": versions}


BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, Arm's BF16 extension


def bf16_dot_products() -> bool:
    """Whether this CPU has bf16 dot-product instructions (from /proc/cpuinfo's flags). Without
    them torch's bf16 matmuls are a fraction of float32's (64 against 313 GFLOP/s on the
    2-core AVX-512 Xeon of benchmarks/results/train-prefill-2026-12-07), so bf16 compute is
    not a format worth timing there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool(BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


class CopyProbe:
    """One copy of a float32 buffer at least the weights' size (and 64 MiB, so that caches do
    not flatter it): `rate()` times one and returns its read + write bytes/s. `retnet bench`
    takes its copies beside each decode cell's rounds, so a cell's floor is measured on the
    machine its steps ran on (a shared machine's bandwidth moves by half within an hour)."""

    def __init__(self, weight_bytes: int) -> None:
        size = max(weight_bytes, 64 << 20) // 4
        self.src, self.dst = torch.randn(size), torch.empty(size)
        self.nbytes = size * 4

    def rate(self) -> float:
        start = time.perf_counter()
        self.dst.copy_(self.src)
        return 2 * self.nbytes / (time.perf_counter() - start)


BF16_BUDGET_S = 5.0  # the most the bf16 matmuls of one measurement may take
BF16_PROBE_N = 256  # the product timed first to size them (~25 ms at AVX2's ~1 GFLOP/s)


def bf16_matmul_n(n: int, rounds: int, budget_s: float = BF16_BUDGET_S) -> int:
    """The largest n / 2^i (at least BF16_PROBE_N) whose rounds + 1 bf16 products n × n × n fit
    in budget_s, judged from one small product's time: a CPU without bf16 dot products (AVX2
    only, ~1 GFLOP/s) takes minutes over the float32 size's 2048³, one with them keeps n."""
    a = torch.randn(BF16_PROBE_N, BF16_PROBE_N).bfloat16()
    s_per_flop = min(repeat_timed(lambda: a @ a, 2, warmup=1)) / (2 * BF16_PROBE_N**3)
    while n > BF16_PROBE_N and (rounds + 1) * 2 * n**3 * s_per_flop > budget_s:
        n //= 2
    return n


def measure_limits(weight_bytes: int, quick: bool = False) -> dict:
    """The best of several float32 and bf16 matmuls (n × n × n, FLOP/s) and of several copies of a
    buffer at least the weights' size (read + write bytes/s): the machine's peaks, measured
    the same way in every run (the best, since a shared machine only ever slows a round). The
    bf16 products are made smaller where they would take over BF16_BUDGET_S
    (`bf16_matmul_n`; their n is "matmul_n_bf16")."""
    n, rounds = (512, 3) if quick else (2048, 10)
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul_s = min(repeat_timed(lambda: a @ b, rounds, warmup=1))
    n16 = bf16_matmul_n(n, rounds)
    # the peak bf16 training's MFU is against
    a16, b16 = a[:n16, :n16].bfloat16(), b[:n16, :n16].bfloat16()
    matmul16_s = min(repeat_timed(lambda: a16 @ b16, rounds, warmup=1))
    probe = CopyProbe(weight_bytes)
    probe.rate()  # warm-up: the first copy faults the destination's pages in
    return {"matmul_flops": 2 * n**3 / matmul_s, "matmul_n": n,
            "matmul_flops_bf16": 2 * n16**3 / matmul16_s, "matmul_n_bf16": n16,
            "copy_bytes_per_s": max(probe.rate() for _ in range(rounds)),
            "copy_buffer_bytes": probe.nbytes}


PEAKS = ("matmul_flops", "matmul_flops_bf16", "copy_bytes_per_s")


def best_limits(start: dict, end: dict) -> dict:
    """The limits measured at a run's start and end, each peak the better of the two (a busy
    spell at the start would otherwise understate the peak every cell is measured against);
    both measurements are kept under "start" and "end", with the n of their bf16 products."""
    best = {**start, **{k: max(start[k], end[k]) for k in PEAKS}}
    if end["matmul_flops_bf16"] > start["matmul_flops_bf16"] and "matmul_n_bf16" in end:
        best["matmul_n_bf16"] = end["matmul_n_bf16"]  # the n of the better bf16 products
    kept = (*PEAKS, "matmul_n_bf16")
    return best | {"start": {k: start[k] for k in kept if k in start},
                   "end": {k: end[k] for k in kept if k in end}}


def header(*details: str) -> str:
    """The first line of a script's report: its command, the machine and versions, details."""
    machine = describe_machine()
    return (f"`python {' '.join(sys.argv)}` — {machine['cpu']}, {machine['cores']} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            + ", ".join(details))
