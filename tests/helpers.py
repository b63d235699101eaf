"""Small builders shared by the model-level tests."""

from __future__ import annotations

import torch

from retnet import RetNetConfig, RetNetLM

# (mode, chunk_size) pairs covering every form; 7 divides nothing used below.
FORMS = [("parallel", 64), ("recurrent", 64), ("chunkwise", 7), ("chunkwise", 64)]
FORM_IDS = ["parallel", "recurrent", "chunkwise7", "chunkwise64"]


def tiny_model(dtype=torch.float32, **overrides) -> RetNetLM:
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", **{"vocab_size": 256, **overrides})
    return RetNetLM(config).to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def fifty_step_curve(loss_of, vocab: int = 300, length: int = 17, amp=None) -> list[float]:
    """Losses of 50 training steps of a tiny model (fixed seed, float32 weights, autocast to
    `amp` if given) on a learnable task (each token is the last one + 1).
    loss_of(model, ids, targets) -> scalar loss."""
    from retnet.train.step import adamw, train_step

    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (50, 4, 1), generator=g)
    rows = (starts + torch.arange(length)) % vocab
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=vocab))
    # 2e-3: at 3e-3 a loss spike near step 40 amplifies float32 rounding past 1e-4
    optimizer = adamw(model, 2e-3)
    return [train_step(model, optimizer, [batch], 2e-3,
                       loss_of=lambda ids, t: loss_of(model, ids, t), amp=amp)
            for batch in rows]
