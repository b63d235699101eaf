"""What a one-token step costs around the fused CPU kernel: the bare `decode_step` call, the
decode loop's step (`generation.decode_one`, as `generate`, `retnet serve` and `retnet bench`
run it), and `model(...)` in recurrent mode, each with the greedy choice, in shuffled rounds on
the same model and state; and how long a trivial torch call takes right after a step (cold)
against a second time (warm): a step streams every weight through the caches, so the Python
between two steps runs cold.

    python benchmarks/step_overhead.py [--preset small] [--formats f32,int8]
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from retnet.bench.backends import retnet_backend
from retnet.bench.machine import header
from retnet.bench.measure import script_parser, write_results
from retnet.generation import decode_one
from retnet.kernels.decode import cached_plan
from retnet.model import RetNetConfig

ROUNDS, STEPS, CONTEXT = 60, 4, 8192


def variants(model, batch: int) -> dict:
    """name -> a callable running one step after CONTEXT tokens, into the same out buffers."""
    state = model.init_state(batch)
    state = type(state)(tuple(torch.randn_like(t) * 1e-2 for t in state.kv),
                        state.offset + CONTEXT)
    out = state.empty_like()
    token = torch.randint(0, model.config.vocab_size, (batch,))
    sources, stamp, plan = cached_plan(model)
    args = (token, torch.empty(0, dtype=torch.bool), state.offset, out.offset, plan["embed"],
            plan["embed_scale"], plan["weights"], plan["scales"], plan["vectors"],
            list(state.kv), list(out.kv), plan["log_decay"], plan["inv_freq"], plan["ints"],
            plan["floats"], sources, stamp)

    def forward():
        return model.step(token[:, None], state, out).logits

    return {"kernel call": lambda: torch.ops.retnet.decode_step(*args).argmax(-1),
            "decode_one (the decode loop)":
                lambda: decode_one(model, token, state, out=out)[0].argmax(-1),
            "model(..., mode='recurrent')": lambda: forward()[:, -1].argmax(-1)}


def shuffled_medians(fns: dict) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(ROUNDS):
        random.shuffle(names)
        for name in names:
            start = time.perf_counter()
            for _ in range(STEPS):
                fns[name]()
            times[name].append((time.perf_counter() - start) / STEPS)
    return {name: statistics.median(t) for name, t in times.items()}


def cold_and_warm(step) -> tuple[float, float]:
    """Median seconds of torch.empty(3) right after a step, and right after that."""
    cold, warm = [], []
    for _ in range(ROUNDS):
        step()
        for into in (cold, warm):
            start = time.perf_counter()
            torch.empty(3)
            into.append(time.perf_counter() - start)
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--formats", default="f32,int8")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    config = RetNetConfig.from_preset(args.preset)
    make = {"f32": lambda: retnet_backend(config),
            "bf16": lambda: retnet_backend(config, torch.bfloat16),
            "int8": lambda: retnet_backend(config, quantization="int8")}
    lines = [header(f"preset {args.preset}, batch {args.batch}, after {CONTEXT} tokens",
                    f"{ROUNDS} shuffled rounds of {STEPS} steps, medians"), ""]
    data: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for fmt in args.formats.split(","):
            model = make[fmt]().model
            fns = variants(model, args.batch)
            data[fmt] = medians = shuffled_medians(fns)
            base = medians["kernel call"]
            for name, t in medians.items():
                lines.append(f"    {fmt:5s} {name:30s} {1e3 * t:7.3f} ms  "
                             f"(+{1e3 * (t - base):.3f} ms)")
            cold, warm = cold_and_warm(fns["kernel call"])
            data[fmt] |= {"empty_after_step_s": cold, "empty_again_s": warm}
            lines.append(f"    {fmt:5s} torch.empty(3) right after a step {1e6 * cold:.1f} µs, "
                         f"again {1e6 * warm:.1f} µs")
    write_results(args.out, "step_overhead", data, lines)


if __name__ == "__main__":
    main()
