"""Two revisions of the chunkwise autograd Function (src/retnet/kernels/chunkwise.py) side by side
in one process: forward + backward of one retention layer, alternating, and whether they agree.

    python benchmarks/chunkwise_ab.py REV [--batch 16] [--length 512] [--chunk 128]
        [--rounds 6]

REV's copy of the file (src/retnet/ops/chunkwise.py before it moved) is loaded as its own
module beside the current one (both take the same arguments). Shapes are the `small` preset's
heads (H = 2, K = 256, V = 512 + the score-sum column), a zero incoming state as in training,
float32. Prints each side's per-round times, medians, the current one's over REV's, and the
largest difference of their outputs and input gradients relative to the largest value.
The 0.283 -> 0.230 s figure in
docs/implementation-notes.md ("What a training step keeps") comes from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from retnet.kernels import chunkwise
from retnet.memory import keep_freed_memory
from retnet.ops import log_decays

ROOT = Path(__file__).resolve().parents[1]
FILES = ("src/retnet/kernels/chunkwise.py", "src/retnet/ops/chunkwise.py")  # new, old place


def load_revision(rev: str):
    """REV's chunkwise.py as a module of its own."""
    for file in FILES:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{file}"],
                               capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    text = shown.stdout
    path = Path(tempfile.mkdtemp()) / "chunkwise_rev.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("chunkwise_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    keep_freed_memory(True)  # as the retnet command runs
    torch.manual_seed(0)
    B, T, H, K, V = args.batch, args.length, 2, 256, 513
    q, k, v = (torch.randn(B, T, H, d, requires_grad=True) for d in (K, K, V))
    log_decay, state, do = log_decays(H), torch.zeros(B, H, K, V), torch.randn(B, T, H, V)

    def run(module) -> list[torch.Tensor]:
        o, _ = module.chunkwise_retention(q, k, v, log_decay, state, None, args.chunk)
        return [o.detach(), *torch.autograd.grad(o, (q, k, v), do)]

    sides = {args.rev: load_revision(args.rev), "current": chunkwise}
    outputs = {name: run(module) for name, module in sides.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, module in sides.items():
            start = time.perf_counter()
            run(module)
            times[name].append(time.perf_counter() - start)
    print(f"`python {' '.join(sys.argv)}`, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; B {B}, T {T}, chunk {args.chunk}")
    for name, ts in times.items():
        print(f"{name:>10}: " + " ".join(f"{t:.3f}" for t in ts)
              + f"  median {statistics.median(ts):.3f} s")
    ratio = statistics.median(times["current"]) / statistics.median(times[args.rev])
    worst = max(float((a - b).abs().max() / b.abs().max())
                for a, b in zip(outputs["current"], outputs[args.rev]))
    print(f"current / {args.rev}: {ratio:.2f}; largest difference (o, dq, dk, dv): {worst:.1e}")


if __name__ == "__main__":
    main()
