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

import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def decode_profile() -> float:
    from torch.profiler import ProfilerActivity, profile

    from retnet import RetNetConfig, RetNetLM, use_inference_layout
    from retnet.generation import decode_one, prefill

    torch.manual_seed(0)
    model = use_inference_layout(RetNetLM(RetNetConfig.from_preset("small")).eval())
    logits, state = prefill(model, torch.randint(0, 32000, (1, 64)))
    token, out = logits.argmax(-1), state.empty_like()
    for _ in range(5):
        decode_one(model, token, state, out=out)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
            decode_one(model, token, state, out=out)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    # weight products: mm, or bmm whose second operand is a weight (not the [H, K, V+1] state)
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm" or (
        e.key == "aten::bmm" and e.input_shapes and e.input_shapes[1][-2:] != [256, 513]))
    return mm / total


def main() -> None:
    torch.manual_seed(0)
    head = torch.randn(32000, 512)
    head_t = head.t().contiguous()
    x = torch.randn(1, 512)
    print(f"LM head F.linear([1,512], [32000,512]): {median_ms(lambda: F.linear(x, head)):.2f} ms")
    print(f"LM head x @ W from a [512,32000] copy:   {median_ms(lambda: x @ head_t):.2f} ms")
    mats = [torch.randn(1024, 512) for _ in range(80)]  # 168 MB
    mats_bf16 = [m.bfloat16() for m in mats]
    x_bf16 = x.bfloat16()
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        ms = median_ms(lambda: [F.linear(x, m) for m in mats])
        print(f"80 float32 GEMVs (168 MB), {n} thread(s): {ms:.2f} ms = {168 / ms:.1f} GB/s")
    torch.set_num_threads(threads)
    ms = median_ms(lambda: [F.linear(x_bf16, m) for m in mats_bf16])
    print(f"80 bf16 GEMVs (84 MB), {threads} thread(s): {ms:.2f} ms")
    from retnet.ops.linear import linear

    ms = median_ms(lambda: [linear(x, m) for m in mats])
    print(f"80 float32 GEMVs through retnet.ops.linear, default layout: {ms:.2f} ms "
          f"= {168 / ms:.1f} GB/s")
    mats_t = [m.t().contiguous().t() for m in mats]  # the decode layout
    ms = median_ms(lambda: [linear(x, m) for m in mats_t])
    print(f"80 float32 GEMVs through retnet.ops.linear, decode layout:  {ms:.2f} ms "
          f"= {168 / ms:.1f} GB/s")
    head_decode = head.t().contiguous().t()
    print(f"LM head through retnet.ops.linear, decode layout: "
          f"{median_ms(lambda: linear(x, head_decode)):.2f} ms")
    big = torch.randn(168 * 2**20 // 4)
    out = torch.empty_like(big)
    ms = median_ms(lambda: out.copy_(big), n=10)
    print(f"copy of 168 MB: {2 * 168 * 1.048576 / ms:.1f} GB/s (read + write)")
    print(f"share of the weight products in a small decode step (batch 1): "
          f"{100 * decode_profile():.0f}%")


if __name__ == "__main__":
    main()
