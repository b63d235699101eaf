"""Where the time goes: torch.profiler's share of each operator in a decode step (batch 1 and
8), an 8192-token prefill and a T = 2048 training step of the `small` model, run as the
`retnet` command runs them (decode weight layout, reused state buffers, freed memory kept).

    python benchmarks/profile_steps.py [--out benchmarks/results/profile.txt]

The shares are of the profiler's self CPU time; the top operators of each job are printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from retnet import RetNetConfig, RetNetLM, lm_loss, use_inference_layout
from retnet.generation import decode_one, prefill
from retnet.memory import keep_freed_memory


def shares(fn: Callable[[], None], repeats: int, top: int = 8) -> list[tuple[str, float]]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / total) for e in ranked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/profile.txt")
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("small")
    model = RetNetLM(config).eval()
    jobs: dict[str, tuple[Callable[[], None], int]] = {}
    use_inference_layout(model)
    for batch in (1, 8):
        _, state = prefill(model, torch.randint(0, config.vocab_size, (batch, 64)))
        token, out = torch.zeros(batch, dtype=torch.long), state.empty_like()

        def step(token=token, state=state, out=out) -> None:
            decode_one(model, token, state, out=out)[0].argmax(-1)

        jobs[f"decode step, batch {batch}"] = (step, 10)
    ids = torch.randint(0, config.vocab_size, (1, 8192))
    jobs["prefill of 8192 tokens (chunkwise, chunk 128)"] = (
        lambda: prefill(model, ids, chunk_size=128), 1)
    batch = torch.randint(0, config.vocab_size, (4, 2049))

    def train_step() -> None:
        from retnet.model.layout import set_weight_layout

        set_weight_layout(model, "default")
        model.train()
        out = model(batch[:, :-1], mode="chunkwise", chunk_size=128)
        lm_loss(out.logits, batch[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    jobs["training step, 4 x 2048 tokens (chunkwise, chunk 128)"] = (train_step, 1)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset small, "
             "float32; share of profiler self CPU time", ""]
    for name, (fn, repeats) in jobs.items():
        lines.append(name)
        lines += [f"  {share:6.1%}  {op}" for op, share in shares(fn, repeats)]
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
