"""Why a batch-1 decode step is far above its bandwidth floor: the matrix-vector products.

Measures (median of 30 after 5 warm-ups): the tied LM head as F.linear over [V, D] and as
x @ W from a contiguous [D, V] copy; 80 GEMVs over 1024 × 512 float32 matrices (about the
`small` model's weight bytes) at 1 and 2 threads; the same in bf16; the same through
retnet.ops.linear (split across cores) in the default and the decode layout; and
torch.profiler's share of the weight products in a `small` decode step as the project runs it
(decode layout, state buffer reused).

    python benchmarks/gemv.py
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from retnet.bench.measure import median_ms
from retnet.ops.linear import linear

MATRICES, MIB = 80, 168  # 80 matrices of [1024, 512] float32: 168 MB, about `small`'s weights


def weight_share_of_decode() -> float:
    """The share of the weight products in the self CPU time of a `small` batch-1 decode step."""
    from retnet.bench.profile import decode_step, profiled, prompt, small_decoder

    model = small_decoder()
    step = decode_step(model, prompt(model, 1))
    events, total = profiled(step, repeats=10, warmup=5, by_shape=True)
    # weight products: mm, or bmm whose second operand is a weight (not the [H, K, V+1] state)
    state_shape = [model.config.key_head_dim, model.config.value_head_dim + 1]
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm" or (
        e.key == "aten::bmm" and e.input_shapes and e.input_shapes[1][-2:] != state_shape))
    return mm / total


def lm_head_lines(x: torch.Tensor) -> list[str]:
    head = torch.randn(32000, 512)  # [V, D]
    head_t = head.t().contiguous()  # [D, V]
    head_decode = head.t().contiguous().t()  # [V, D] view of a [D, V] buffer: the decode layout
    return [f"LM head F.linear([1,512], [32000,512]): "
            f"{median_ms(lambda: F.linear(x, head)):.2f} ms",
            f"LM head x @ W from a [512,32000] copy:   {median_ms(lambda: x @ head_t):.2f} ms",
            f"LM head through retnet.ops.linear, decode layout: "
            f"{median_ms(lambda: linear(x, head_decode)):.2f} ms"]


def gemv_lines(x: torch.Tensor) -> list[str]:
    mats = [torch.randn(1024, 512) for _ in range(MATRICES)]
    lines, threads = [], torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        ms = median_ms(lambda: [F.linear(x, m) for m in mats])
        lines.append(f"80 float32 GEMVs ({MIB} MB), {n} thread(s): {ms:.2f} ms = "
                     f"{MIB / ms:.1f} GB/s")
    torch.set_num_threads(threads)
    mats_bf16, x_bf16 = [m.bfloat16() for m in mats], x.bfloat16()
    ms = median_ms(lambda: [F.linear(x_bf16, m) for m in mats_bf16])
    lines.append(f"80 bf16 GEMVs ({MIB // 2} MB), {threads} thread(s): {ms:.2f} ms")
    mats_decode = [m.t().contiguous().t() for m in mats]  # the decode layout
    for name, weights in (("default layout: ", mats), ("decode layout:  ", mats_decode)):
        ms = median_ms(lambda w=weights: [linear(x, m) for m in w])
        lines.append(f"80 float32 GEMVs through retnet.ops.linear, {name}{ms:.2f} ms "
                     f"= {MIB / ms:.1f} GB/s")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(1, 512)  # [1, D]: one token's hidden state
    for line in lm_head_lines(x) + gemv_lines(x):
        print(line)
    big = torch.randn(MIB * 2**20 // 4)
    out = torch.empty_like(big)
    ms = median_ms(lambda: out.copy_(big), n=10)
    print(f"copy of {MIB} MB: {2 * MIB * 1.048576 / ms:.1f} GB/s (read + write)")
    print(f"share of the weight products in a small decode step (batch 1): "
          f"{100 * weight_share_of_decode():.0f}%")


if __name__ == "__main__":
    main()
