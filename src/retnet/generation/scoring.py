"""Log-probabilities of given tokens: the one scoring of a text, used by the evaluator
(continuations, whole documents) and by the server (a prompt echoed with its logprobs). In
float64, so that sums over long documents do not depend on how they were batched or cut."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from retnet.generation.loop import read_segments
from retnet.model import RetNetLM, RetNetOutput, RetNetState
from retnet.ops import CHUNKWISE, Form


class Scores(NamedTuple):
    """The scores of T' target tokens, one per position that predicts one."""

    targets: Tensor  # [T'] the tokens scored
    logprobs: Tensor  # [T'] float64: log P(target | the tokens before it)
    greedy: Tensor  # [T'] bool: whether the target is the most likely token there
    top: tuple[Tensor, Tensor] | None  # (values, token ids) [T', k] of the k likeliest


def log_probs(logits: Tensor) -> Tensor:
    """float64 log-softmax of logits [..., V]."""
    return logits.double().log_softmax(-1)


def score_tokens(logits: Tensor, targets: Sequence[int] | Tensor, top: int = 0) -> Scores:
    """Score targets [T'] against the logits [T, V] of the positions that predict them
    (T' ≤ T: the first T' positions; a prompt's last position predicts nothing of it)."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    logprobs = log_probs(logits[:len(targets)])  # [T', V]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    best = logprobs.topk(top, -1) if top else None
    return Scores(targets, picked, greedy,
                  None if best is None else (best.values, best.indices))


def score_segments(model: RetNetLM, ids: Tensor, targets: Sequence[int],
                   state: RetNetState | None = None, *, form: Form = CHUNKWISE,
                   segment: int | None = None, top: int = 0
                   ) -> Iterator[tuple[Scores, RetNetOutput]]:
    """Read ids [1, T] in segments that carry the state (`read_segments`) and score, at each
    position t, the token targets[t] that follows it; yield (scores, output) per segment."""
    for start, out in read_segments(model, ids, state=state, form=form, segment=segment,
                                    last_only=False):
        logits = out.logits[0]  # [T_s, V]
        yield score_tokens(logits, targets[start:start + logits.shape[0]], top), out
