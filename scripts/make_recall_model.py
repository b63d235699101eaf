"""Train the state-sensitive test model: a tiny byte-level RetNet that copies a random string.

An episode is "<letters>|<the same letters>\n" (6–16 lowercase letters). After the '|' the only
way to predict the next byte is to read it back from the state, so this model's logits, greedy
tokens and beams depend on its whole history, unlike a random or barely trained model's.
Tests load the committed result (tests/data/recall/); rerun this script to remake it:

    .venv/bin/python scripts/make_recall_model.py   # about ten minutes on two CPU cores
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from recall import CONFIG, episode_batch
from retnet import RetNetConfig, RetNetLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "recall"


def main(steps: int = 6000, batch: int = 32, seed: int = 0) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = RetNetLM(RetNetConfig.from_dict(CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, targets = episode_batch(rng, batch, episodes=4)
        logits = model(ids, mode="chunkwise", chunk_size=32).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  copy loss {loss.item():.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, OUT / "model.safetensors", metadata={"format": "retnet-v1"})
    (OUT / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
