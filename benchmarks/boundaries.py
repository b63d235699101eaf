"""What document boundaries cost in training (#35's target: tokens/s with boundaries ≥ 0.95×
without): the same model, batch and tokens through `train_step` in the chunkwise form, with the
resets of packed standard-library documents and without any, alternated round by round in one
process, medians.

    .venv/bin/python benchmarks/boundaries.py [--preset small] [--seq-len 2048] [--doc-tokens N]
        [--out DIR]
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from retnet.bench.machine import describe_machine, header
from retnet.bench.measure import script_parser, write_results
from retnet.data import stdlib_documents
from retnet.model import RetNetConfig, RetNetLM
from retnet.train.step import adamw, train_step

BYTES_PER_TOKEN = 3.6  # the demo BPE on the standard library: document lengths in tokens


def packed_resets(batch: int, seq_len: int, doc_tokens: int = 0, seed: int = 0) -> torch.Tensor:
    """[batch, seq_len] bool: True where a document starts when documents are packed end to
    end, as `retnet train` packs: standard-library files (their lengths in tokens, in shuffled
    order), or documents of `doc_tokens` tokens each."""
    if doc_tokens:
        lengths = [doc_tokens] * (batch * seq_len // doc_tokens + 1)
    else:
        lengths = [max(1, round(len(d.text.encode()) / BYTES_PER_TOKEN))
                   for d in stdlib_documents()]
        random.Random(seed).shuffle(lengths)
    starts, pos = torch.zeros(batch * seq_len, dtype=torch.bool), 0
    for n in lengths:
        if pos >= starts.numel():
            break
        starts[pos] = True
        pos += n
    return starts.view(batch, seq_len)


def main() -> None:
    p = script_parser(__doc__, out="benchmarks/results/boundaries")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--doc-tokens", type=int, default=0,
                   help="documents of this many tokens (default 0: the standard library's)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset(args.preset)).train()
    opt = adamw(model, 1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1))
    resets = packed_resets(args.batch, args.seq_len, args.doc_tokens)
    modes = {"without": None, "with": resets}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):  # round 0 warms both up, unrecorded
        for mode in list(modes) if r % 2 else list(modes)[::-1]:
            loss_of = lambda x, t, m=modes[mode]: model(  # noqa: E731
                x, mode="chunkwise", targets=t, resets=m).loss
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, [ids], 1e-4, loss_of=loss_of)
            if r:
                times[mode].append((time.perf_counter() - start) / args.steps)
    tokens = args.batch * args.seq_len
    med = {m: statistics.median(t) for m, t in times.items()}
    ratio = med["without"] / med["with"]
    docs = int(resets.sum())
    lines = [header(f"ISA {describe_machine()['backend']}", f"preset {args.preset}",
                    f"batch {args.batch} × {args.seq_len} tokens ({docs} document starts)",
                    f"{args.rounds} alternating rounds of {args.steps} steps, medians"), "",
             "| resets | step s | tokens/s |", "|---|---|---|"]
    lines += [f"| {m} | {med[m]:.2f} | {tokens / med[m]:.0f} |" for m in modes]
    lines += ["", f"tokens/s with boundaries / without: {ratio:.3f}× (target ≥ 0.95×)"]
    write_results(args.out, "boundaries", {"seconds": times, "medians": med, "ratio": ratio,
                                           "document_starts": docs}, lines)


if __name__ == "__main__":
    main()
