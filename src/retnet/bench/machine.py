"""What the machine can do: measured float32 matmul FLOP/s and copy bandwidth over a buffer at
least the size of the weights (so that caches do not flatter it), and what it is."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def describe_machine() -> dict:
    import numpy

    import retnet

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "retnet": retnet.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "yet-another-retnet"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "backend": torch.backends.cpu.get_cpu_capability(), "versions": versions}


def measure_limits(weight_bytes: int, quick: bool = False) -> dict:
    """Median float32 matmul FLOP/s (n × n × n) and copy bandwidth (read + write bytes/s)."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        a @ b
        flops.append(2 * n**3 / (time.perf_counter() - start))
    size = max(weight_bytes, 64 << 20) // 4
    src, dst = torch.randn(size), torch.empty(size)
    bandwidth = []
    for _ in range(3 if quick else 10):
        start = time.perf_counter()
        dst.copy_(src)
        bandwidth.append(2 * size * 4 / (time.perf_counter() - start))
    return {"matmul_flops": statistics.median(flops), "matmul_n": n,
            "copy_bytes_per_s": statistics.median(bandwidth), "copy_buffer_bytes": size * 4}
