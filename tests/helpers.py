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
