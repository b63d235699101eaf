"""What a training step keeps for its backward, by the line of retnet code that saved it.

One chunkwise forward of the small preset at B = 4, T = 2048 (8192 tokens, the bench's
training step) through the chunked loss, under `torch.autograd.graph.saved_tensors_hooks`;
each storage is counted once. The figure in docs/implementation-notes.md ("The output gate's
backward") comes from this script.

    python benchmarks/saved_tensors.py
"""

from __future__ import annotations

import collections
import traceback

import torch

from retnet.bench.measure import BENCH_FORM
from retnet.model import RetNetConfig, RetNetLM


def main() -> None:
    config = RetNetConfig.from_preset("small")
    model = RetNetLM(config).train()
    ids = torch.randint(0, config.vocab_size, (4, 2049))
    seen: set[int] = set()
    sizes: collections.Counter[str] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            frames = [f for f in traceback.extract_stack() if "/retnet/" in f.filename]
            where = (f"{frames[-1].filename.split('/retnet/')[-1]}:{frames[-1].lineno}"
                     if frames else "?")
            sizes[where] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], mode=BENCH_FORM, targets=ids[:, 1:])
    print(f"saved for the backward: {sum(sizes.values()) / 2**30:.2f} GiB")
    for where, n in sizes.most_common(15):
        print(f"{n / 2**20:8.1f} MiB  {where}")


if __name__ == "__main__":
    main()
