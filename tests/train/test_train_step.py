"""One optimiser step of `retnet train`, with the data fed explicitly: gradient accumulation,
clipping, activation checkpointing and the weight-decay groups, checked on `.grad` (before
AdamW, which would hide a scale error) against computations that do not use the step."""

from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_model, tokens
from retnet import lm_loss
from retnet.train import TrainConfig, micro_batches, param_groups, train_step
from retnet.train.distributed import Context

CPU = Context(rank=0, world=1, device=torch.device("cpu"))


class Rows:
    """A loader whose batch for index i is rows[i·b:(i+1)·b], so each micro-batch is known."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.calls: list[int] = []

    def batch(self, seed: int, index: int, batch_size: int, rank: int, world: int):
        self.calls.append(index)
        return self.rows[index * batch_size:(index + 1) * batch_size]


class GradRecorder(torch.optim.SGD):
    """An optimiser that records the gradients it is handed and leaves the parameters alone."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.seen: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]
                          if p.grad is not None})


def one_step(model, rows, **cfg):
    """Step 1 of a run with these options, as `retnet train` does it."""
    cfg = TrainConfig(data="unused", steps=10, warmup=0, **cfg)
    run = SimpleNamespace(wrapped=model.train(), optimizer=GradRecorder(model.parameters()),
                          train=Rows(rows))
    batches = micro_batches(run.train, cfg.seed, 1, cfg.batch_size, cfg.grad_accum, CPU)
    loss = train_step(run.wrapped, run.optimizer, batches, cfg.lr_schedule.lr_at(1),
                      loss_of=lambda ids, t: run.wrapped(ids, mode=cfg.form, targets=t).loss,
                      clip=cfg.clip,
                      ctx=CPU)
    return loss, run.optimizer.seen[0], run.train.calls


def plain_grads(model, rows):
    """The reference: one backward of the plain loss over all rows at once."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(rows[:, :-1]).logits, rows[:, 1:])
    loss.backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)).item() for k in b)


@pytest.mark.parametrize("k", [2, 3])
def test_accumulating_k_micro_batches_equals_one_batch_of_their_rows(k):
    model = tiny_model(torch.float64)
    b = 2
    # step 1 of a k-micro-batch run reads micro-batches 1·k … 1·k + k − 1
    rows = tokens(b * k * 2, 17, seed=3)
    loss, grads, calls = one_step(model, rows, batch_size=b, grad_accum=k, clip=0.0)
    assert calls == list(range(k, 2 * k))
    ref_loss, ref = plain_grads(model, rows[k * b:2 * k * b])
    assert loss == pytest.approx(ref_loss, rel=1e-12)  # the logged loss: the mean, not the sum
    assert max_rel(grads, ref) < 1e-10


def test_clipping_scales_the_gradient_to_the_stated_norm():
    model = tiny_model(torch.float64)
    rows = tokens(4, 17, seed=4)
    _, ref = plain_grads(model, rows[2:4])
    raw_norm = torch.cat([g.flatten() for g in ref.values()]).norm().item()
    clip = raw_norm / 7
    _, grads, _ = one_step(model, rows, batch_size=2, clip=clip)
    # torch scales by clip / (norm + 1e-6): the stated norm to within 1e-6 / norm
    assert torch.cat([g.flatten() for g in grads.values()]).norm().item() == pytest.approx(
        clip, rel=1e-5)
    assert max_rel({k: g * (raw_norm / clip) for k, g in grads.items()}, ref) < 1e-5
    # a norm below the limit is left alone
    _, grads, _ = one_step(model, rows, batch_size=2, clip=raw_norm * 2)
    assert max_rel(grads, ref) < 1e-12


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    model = tiny_model(torch.float64)
    rows = tokens(2, 33, seed=5)
    _, ref = plain_grads(model, rows)
    model.activation_checkpointing = True
    _, got = plain_grads(model, rows)
    assert max_rel(got, ref) < 1e-12
    # and the recomputation really happened: the forward runs again in backward
    calls = []
    ffn = model.blocks[0].ffn
    forward = ffn.forward
    monkeypatch.setattr(ffn, "forward", lambda x, **kw: calls.append(1) or forward(x, **kw))
    plain_grads(model, rows)
    assert len(calls) == 2


def test_weight_decay_falls_on_the_linear_matrices_only():
    model = tiny_model(tie_embeddings=False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    matrices = {f"{prefix}.weight" for prefix, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and prefix != "lm_head"}
    assert decayed == matrices
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - matrices
    assert "embed.weight" not in decayed and "lm_head.weight" not in decayed


def test_lm_loss_is_the_mean_over_the_targets_that_count():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    lp = logits.log_softmax(-1)
    keep = [(b, t) for b in range(2) for t in range(5) if targets[b, t] >= 0]
    expected = -sum(lp[b, t, targets[b, t]] for b, t in keep) / len(keep)
    assert lm_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-12)
