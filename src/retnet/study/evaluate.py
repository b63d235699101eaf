"""What a finished cell is measured on besides its validation loss (issue #38 item 5): the loss
by position over windows LENGTH_FACTOR× the training length (does the model use, or break on,
context it never trained on?) and the shipped multiple-choice tasks at 0 and k shots through
lm-eval's `num_fewshot`. Every architecture is read through its wrapper's `logits`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

LENGTH_FACTOR = 8  # windows 8× the training length, in 8 buckets of one training length each
POSITION_WINDOWS = 8  # validation windows of that length, averaged
SHOTS = (0, 3)
TASKS = ("python_mc",)  # 30 Python-syntax items written for the stdlib corpus


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, windows: list[torch.Tensor], buckets: int
                     ) -> list[float]:
    """Mean next-token loss in `buckets` equal spans of position; windows [B, T + 1]."""
    if not windows:
        raise ValueError("the validation split holds no window of this length")
    model.eval()
    device = next(model.parameters()).device
    total = None
    for w in windows:
        w = w.to(device)
        logits = model.logits(w[:, :-1])  # [B, T, V]; half precision read in float32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
        total = nll.mean(0) if total is None else total + nll.mean(0)  # [T]
    model.train()
    return [x.mean().item() for x in (total / len(windows)).chunk(buckets)]


class HarnessView(torch.nn.Module):
    """The call lm-eval's adapter makes of a RetNetLM — model(ids, attention_mask, mode) ->
    .logits — for any wrapped cell model. Rows come one at a time (batch size 1), so there is
    no padding: Mamba's and RWKV's PyTorch paths would read left padding into their state."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    @property
    def embed(self) -> SimpleNamespace:  # the adapter reads .embed.weight.device
        return SimpleNamespace(weight=next(self.wrapped.parameters()))

    def forward(self, ids: torch.Tensor, attention_mask=None, **_: Any) -> SimpleNamespace:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HarnessView scores one unpadded row at a time")
        return SimpleNamespace(logits=self.wrapped.logits(ids), state=None)


def few_shot(model: torch.nn.Module, tokenizer, tasks=TASKS, shots=SHOTS) -> dict[str, Any]:
    """{"TASK": {"0": acc, "3": acc, ...}} through the one lm-eval driver."""
    from retnet.eval.tasks import evaluate_tasks

    view = HarnessView(model).eval()
    out: dict[str, Any] = {t: {} for t in tasks}
    for k in shots:
        results = evaluate_tasks(view, tokenizer, list(tasks), num_fewshot=k, batch_size=1)
        for t in tasks:
            out[t][str(k)] = results["results"][t]["acc,none"]
    model.train()
    return out
