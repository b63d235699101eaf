"""Where the time goes: torch.profiler's share of each operator in a decode step (batch 1 and
8), an 8192-token prefill and a T = 2048 training step of the `small` model, run as the
`retnet` command runs them (decode weight layout, reused state buffers, freed memory kept).

    python benchmarks/profile_steps.py [--out benchmarks/results/profile.txt]

The shares are of the profiler's self CPU time; the top operators of each job are printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from retnet.bench.measure import BENCH_FORM
from retnet.generation import decode_one, prefill
from retnet.memory import keep_freed_memory
from retnet.model import RetNetConfig, RetNetLM, use_inference_layout

PROMPT_TOKENS = 64  # the context a profiled decode step runs after


def small_decoder() -> RetNetLM:
    """The `small` model (seed 0) in the decode weight layout, as `retnet generate` runs it."""
    torch.manual_seed(0)
    return use_inference_layout(RetNetLM(RetNetConfig.from_preset("small")).eval())


def prompt(model: RetNetLM, batch: int) -> torch.Tensor:
    """Random token ids [batch, PROMPT_TOKENS]: the context of a profiled decode step."""
    return torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS))


def decode_step(model: RetNetLM, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One greedy decode step after the prompt ids [B, T], into a reused state buffer; it
    returns the logits [B, V]. The input state is not advanced, so every call costs the same."""
    logits, state = prefill(model, ids)
    token, out = logits.argmax(-1), state.empty_like()  # token [B]

    def step() -> torch.Tensor:
        logits = decode_one(model, token, state, out=out)[0]  # [B, V]
        logits.argmax(-1)  # the greedy choice, as generation makes it
        return logits

    return step


def profiled(fn: Callable[[], object], repeats: int, warmup: int = 1, by_shape: bool = False
             ) -> tuple[list, float]:
    """torch.profiler's events of `repeats` calls of fn (after `warmup` untimed ones), grouped
    by operator (and input shapes if by_shape), and their total self CPU time."""
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        for _ in range(repeats):
            fn()
    events = list(prof.key_averages(group_by_input_shape=by_shape))
    return events, sum(e.self_cpu_time_total for e in events)


def shares(fn: Callable[[], object], repeats: int, top: int = 8) -> list[tuple[str, float]]:
    """The `top` operators of fn by share of self CPU time."""
    events, total = profiled(fn, repeats)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / total) for e in ranked]


def jobs(model: RetNetLM) -> dict[str, tuple[Callable[[], object], int]]:
    """Each profiled job by name, with how many calls of it are profiled."""
    vocab = model.config.vocab_size
    out = {f"decode step, batch {b}": (decode_step(model, prompt(model, b)), 10) for b in (1, 8)}
    ids = torch.randint(0, vocab, (1, 8192))
    out[f"prefill of 8192 tokens (chunkwise, chunk {BENCH_FORM.chunk_size})"] = (
        lambda: prefill(model, ids, form=BENCH_FORM), 1)
    batch = torch.randint(0, vocab, (4, 2049))  # [B, T + 1]

    def train_step() -> None:
        from retnet.modules.layout import set_weight_layout

        set_weight_layout(model, "default")
        model.train()
        # the chunked loss, as `retnet train` and `retnet bench` run it
        model(batch[:, :-1], mode=BENCH_FORM, targets=batch[:, 1:]).loss.backward()
        model.zero_grad(set_to_none=True)

    out[f"training step, 4 x 2048 tokens (chunkwise, chunk {BENCH_FORM.chunk_size})"] = (
        train_step, 1)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/profile.txt")
    args = p.parse_args(argv)
    keep_freed_memory()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset small, "
             "float32; share of profiler self CPU time", ""]
    for name, (fn, repeats) in jobs(small_decoder()).items():
        lines.append(name)
        lines += [f"  {share:6.1%}  {op}" for op, share in shares(fn, repeats)]
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
