"""Keep freed memory for reuse instead of handing it back to the kernel at once (glibc).

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
import os

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
