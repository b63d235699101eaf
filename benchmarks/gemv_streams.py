"""How many weight rows a core should read at once, and what a read costs against the copy
that `retnet bench` takes as its bandwidth: why the decode kernel reads four rows far apart.

Each round times, over 200 MB of float32 weights (rotated so no cache holds them): a copy of a
buffer of that size (read + write bytes, as `retnet bench` measures it); a plain read as one and
as four streams per thread; and three matrix-vector products of [N, 512] weights: one row at a
time, four adjacent rows, and four rows a quarter of the thread's share apart (the order of
retnet/kernels/cpu/products.h). The best of 20 rounds, in GB/s and as a share of the copy. Needs
AVX-512 and g++ (the variants are compiled on first run into a temporary folder).

    python benchmarks/gemv_streams.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from retnet.bench.machine import header
from retnet.bench.measure import script_parser, table, write_results
from retnet.kernels.build import command

SOURCE = Path(__file__).with_suffix(".cpp")
GEMVS = {0: "product, one row at a time", 1: "product, four adjacent rows",
         2: "product, four rows far apart (the kernel)"}


def compile_variants(folder: Path) -> None:
    import subprocess

    target = folder / "gemv_streams.so"
    subprocess.run(command("g++", SOURCE, target), check=True)
    torch.ops.load_library(str(target))


def best_rates(rounds: int) -> dict[str, float]:
    """Bytes/s of each variant, the best of `rounds` rounds taken side by side."""
    n, k = 24_000, 512  # 49 MB per matrix; four of them
    weights = [torch.randn(n, k) for _ in range(4)]
    x = torch.randn(k)
    total = 4 * n * k * 4
    src, dst = torch.randn(total // 4), torch.empty(total // 4)
    runs = {"copy (read + write bytes)": (lambda: dst.copy_(src), 2 * total),
            "read, one stream per thread": (
                lambda: [torch.ops.gemv_streams.read(w, 1) for w in weights], total),
            "read, four streams per thread": (
                lambda: [torch.ops.gemv_streams.read(w, 4) for w in weights], total)}
    for v, name in GEMVS.items():
        runs[name] = (lambda v=v: [torch.ops.gemv_streams.gemv(x, w, v) for w in weights], total)
    best = dict.fromkeys(runs, float("inf"))
    for fn, _ in runs.values():
        fn()
    for _ in range(rounds):
        for name, (fn, _) in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: nbytes / best[name] for name, (_, nbytes) in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        compile_variants(Path(folder))
        rates = best_rates(args.rounds)
    copy = rates["copy (read + write bytes)"]
    lines = [header(f"best of {args.rounds} rounds"), "",
             *table(["what", "GB/s", "× copy"], [(name, f"{rate / 1e9:.1f}", f"{rate / copy:.2f}")
                                                for name, rate in rates.items()])]
    write_results(args.out, "gemv_streams", {"bytes_per_s": rates}, lines)


if __name__ == "__main__":
    main()
