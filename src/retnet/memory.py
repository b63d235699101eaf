"""Process memory, in one place: keep freed memory for reuse instead of handing it back to
the kernel at once (glibc), give it back on request, and measure the resident set and its peak.

PyTorch's CPU tensors come straight from malloc. glibc serves blocks above its mmap threshold
(at most 32 MiB) with fresh mmaps and unmaps them on free, so every large temporary of a
forward or backward pass (a [T, H, V] retention output, a [B, N, H, K, V] chunk state, the
[N, vocab] logits gradient) is zero-filled page by page by the kernel, every time.
Raising the mmap and trim thresholds lets malloc reuse those blocks; `malloc_trim(0)` still
returns free memory when asked (the benchmark does so before each measurement, so peak-memory
figures stay honest). The price: the process keeps its peak heap until trimmed.

The `retnet` command-line tool turns this on for its own process; as a library, retnet never
changes the allocator unless `keep_freed_memory()` is called. RETNET_MALLOC=default opts out.
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, and are reused
TRIM_THRESHOLD = 2 << 30  # free memory at the heap's top is kept up to 2 GiB
# glibc's own ceiling for its dynamic thresholds (64-bit): what a long-running process gets
GLIBC_MMAP_CEILING, GLIBC_TRIM_CEILING = 32 << 20, 64 << 20


def keep_freed_memory(enable: bool = True) -> bool:
    """Raise glibc's mmap and trim thresholds (enable=False: back to glibc's own ceiling
    values); False where that is not possible (not glibc, or RETNET_MALLOC=default)."""
    if os.environ.get("RETNET_MALLOC", "").lower() == "default":
        return False
    mmap, trim_at = ((MMAP_THRESHOLD, TRIM_THRESHOLD) if enable
                     else (GLIBC_MMAP_CEILING, GLIBC_TRIM_CEILING))
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)
                    and libc.mallopt(M_TRIM_THRESHOLD, trim_at))
    except (OSError, AttributeError):
        return False


def trim() -> None:
    """Give free heap memory back to the kernel now (glibc's malloc_trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mib(field: str = "VmRSS", pid: int | None = None) -> float:
    """The resident set ("VmRSS") or its peak since the last reset ("VmHWM") of this process
    (or of process `pid`), in MiB, from /proc; NaN where there is no /proc (not Linux)."""
    try:
        lines = Path(f"/proc/{pid or 'self'}/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Collect garbage, give freed heap back, then reset the kernel's peak-RSS counter (Linux),
    so that a job measured after another does not hide its peak in reused heap."""
    gc.collect()
    trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PeakMemory:
    """Peak memory of the work done after construction, in MiB: the CUDA allocator's peak on a
    GPU; on a CPU the resident-set peak above the resident set at the start.

        meter = PeakMemory(device)
        ...  # the work
        meter.mib()
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        reset_peak()
        self.base = rss_mib()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return rss_mib("VmHWM") - self.base
