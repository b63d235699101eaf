"""Two builds of the fused decode step side by side in one process: which is faster, and do they
agree.

Each folder holds a copy of src/retnet/kernels/cpu/ (decode.cpp and its headers), e.g. a past
revision's:

    mkdir -p /tmp/a
    git archive REV src/retnet/kernels/cpu | tar -x -C /tmp/a --strip-components=4
    python benchmarks/kernel_ab.py /tmp/a src/retnet/kernels/cpu [--formats f32,int8]
        [--batches 1,8]

Each build is compiled with the project's flags under its own op namespace (`-Dretnet=retneta`,
`-Dretnetb`), so both load beside each other; for each weight format and batch they run
alternately on the same model plan and state, 30 rounds of 4 steps, and the script prints the
medians and bests of each and B's time over A's, with the largest difference of their logits and
new states (relative to the largest logit). The figures in docs/implementation-notes.md's "fused
CPU decode step" (4-14% per change) and docs/benchmarks.md's "Streaming or plain stores for the
state" come from this script. Needs g++; both builds get the machine's vector ISA (simd.h).
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from retnet.bench.backends import retnet_backend
from retnet.bench.machine import header
from retnet.bench.measure import script_parser
from retnet.kernels.build import command
from retnet.kernels.decode import plan as make_plan
from retnet.model import RetNetConfig

ROUNDS, STEPS = 30, 4


def load_build(folder: Path, namespace: str, out: Path):
    """Compile folder/decode.cpp as `torch.ops.<namespace>` and return its decode_step."""
    target = out / f"{namespace}.so"
    cmd = command("g++", folder / "decode.cpp", target)
    cmd.insert(1, f"-Dretnet={namespace}")
    subprocess.run(cmd, check=True)
    torch.ops.load_library(str(target))
    return getattr(torch.ops, namespace).decode_step


def compare(ops: dict, model, batch: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per step of each build, alternating, and their largest relative difference."""
    plan = make_plan(model)
    state = model.init_state(batch)
    state = type(state)(tuple(torch.randn_like(t) * 1e-2 for t in state.kv), state.offset + 8192)
    out = state.empty_like()
    ids = torch.randint(0, model.config.vocab_size, (batch,))
    mask = torch.ones(batch, dtype=torch.bool)

    def args(op):
        a = (ids, mask, state.offset, out.offset, plan["embed"], plan["embed_scale"],
             plan["weights"], plan["scales"], plan["vectors"], list(state.kv), list(out.kv),
             plan["log_decay"], plan["inv_freq"], plan["ints"], plan["floats"])
        # builds after 7c80240 also take the plan's sources and their stamp (none: no check)
        extra = len(op.default._schema.arguments) - len(a)
        return a + ([], torch.empty(0, dtype=torch.long))[:extra]

    results = []
    for op in ops.values():
        logits = op(*args(op))
        results.append((logits, [t.clone() for t in out.kv]))
    (la, sa), (lb, sb) = results
    scale = la.abs().max().item()
    diff = max((la - lb).abs().max().item(),
               max((x - y).abs().max().item() for x, y in zip(sa, sb))) / scale
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(ROUNDS):
        for name, op in ops.items():
            a = args(op)
            start = time.perf_counter()
            for _ in range(STEPS):
                op(*a)
            times[name].append((time.perf_counter() - start) / STEPS)
    return times, diff


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("a", type=Path, help="folder with build A's decode.cpp")
    p.add_argument("b", type=Path, help="folder with build B's decode.cpp")
    p.add_argument("--formats", default="f32,bf16,int8")
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    config = RetNetConfig.from_preset(args.preset)
    make = {"f32": lambda: retnet_backend(config),
            "bf16": lambda: retnet_backend(config, torch.bfloat16),
            "int8": lambda: retnet_backend(config, quantization="int8")}
    with tempfile.TemporaryDirectory() as tmp:
        ops = {"A": load_build(args.a, "retneta", Path(tmp)),
               "B": load_build(args.b, "retnetb", Path(tmp))}
        models = {f: make[f]().model for f in args.formats.split(",")}
        print(header(f"preset {args.preset}", f"{ROUNDS} rounds of {STEPS} steps"))
        for batch in map(int, args.batches.split(",")):
            for name, model in models.items():
                times, diff = compare(ops, model, batch)
                ma, mb = (statistics.median(times[k]) for k in "AB")
                ba, bb = (min(times[k]) for k in "AB")
                print(f"batch {batch} {name:5s} A {1e3 * ma:6.2f} ms (best {1e3 * ba:6.2f}) | "
                      f"B {1e3 * mb:6.2f} ms (best {1e3 * bb:6.2f}) | B/A {mb / ma:.3f} "
                      f"(best {bb / ba:.3f}) | max difference {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
