"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), the known weak spot of
models with a fixed-size state: a row holds n key-value pairs, then the keys again in another
order, each followed by its value, among blank tokens. Only a value that follows a key seen
before can be predicted, and only those targets are scored, so the accuracy is the fraction
of values recalled. Attention stores every pair; a fixed state must compress them, and the
accuracy against n and the model's width shows where it stops.

    row (n = 2):  k1 v1 k2 v2 · · k2 v2 · k1 v1 · ·    (·: the blank token 0)
    scored:                          ^^       ^^

Cells of task "mqar" train with the study's own loop and checkpoints; only the batches, the
scored targets and the final measurement differ from a language-model cell."""

from __future__ import annotations

import numpy as np
import torch

from retnet.study.grid import Recall

BLANK = 0
TEST_SEED = 1_000_003  # test rows come from a stream no training step reads


def rows(recall: Recall, n: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` rows [count, seq_len + 1] of n pairs each (inputs and shifted targets)."""
    length, keys = recall.seq_len + 1, recall.keys
    out = np.full((count, length), BLANK, dtype=np.int64)
    for r in range(count):
        k = rng.choice(np.arange(1, keys + 1), size=n, replace=False)
        v = rng.integers(keys + 1, recall.vocab_size, size=n)
        out[r, 0:2 * n:2], out[r, 1:2 * n:2] = k, v
        # n query slots of two tokens among the positions after the pairs, in random order
        free = (length - 2 * n) // 2
        slots = 2 * n + 2 * np.sort(rng.choice(free, size=n, replace=False))
        order = rng.permutation(n)
        out[r, slots], out[r, slots + 1] = k[order], v[order]
    return torch.from_numpy(out)


class RecallBatches:
    """The `Windows` protocol of train.step.micro_batches: batch (seed, step) -> rows, the
    number of pairs drawn per step from recall.pairs."""

    def __init__(self, recall: Recall) -> None:
        self.recall = recall

    def batch(self, seed: int, step: int, rows_: int, rank: int = 0, world: int = 1
              ) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        n = int(rng.choice(self.recall.pairs))
        whole = rows(self.recall, n, rows_ * world, rng)
        return whole[rank * rows_:(rank + 1) * rows_]


def scored(ids: torch.Tensor, targets: torch.Tensor, keys: int) -> torch.Tensor:
    """targets [B, T] with -100 everywhere but after a key (1 … keys) seen earlier in its row."""
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
    seen = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(-1)  # [B, T]
    is_key = (ids >= 1) & (ids <= keys)
    return torch.where(seen & is_key, targets, torch.full_like(targets, -100))


class RecallLoss(torch.nn.Module):
    """A study model (RetNetLoss / HFLoss) scored on the recall targets only."""

    def __init__(self, wrapped: torch.nn.Module, keys: int) -> None:
        super().__init__()
        self.wrapped, self.keys = wrapped, keys

    @property
    def model(self) -> torch.nn.Module:  # the library model, as archs.describe reads it
        return self.wrapped.model

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.wrapped.loss(ids, scored(ids, targets, self.keys))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped.logits(ids)

    def non_embedding(self) -> int:
        return self.wrapped.non_embedding()


@torch.no_grad()
def accuracy(model: RecallLoss, recall: Recall, seed: int) -> dict[str, float]:
    """{"n": fraction of values recalled} on test_rows fresh rows per number of pairs."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for n in recall.pairs:
        batch = rows(recall, n, recall.test_rows, np.random.default_rng([TEST_SEED, seed, n]))
        ids, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
        mask = scored(ids, targets, recall.keys) != -100
        hit = model.logits(ids).argmax(-1) == targets
        out[str(n)] = (hit & mask).sum().item() / mask.sum().item()
    model.train()
    return out
