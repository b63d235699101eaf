"""The state-sensitive test model and its task: copy a random string after a '|'.

`recall_model()` loads the committed weights that scripts/make_recall_model.py trains. Use it
wherever a test must see the state at work: its next byte after '|' is only predictable from
the history, so a state bug changes its logits and greedy tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from retnet import RetNetConfig, RetNetLM

DATA = Path(__file__).parent / "data" / "recall"
# Byte-level (ByteTokenizer: 256 bytes, <|endoftext|> = 256, <|pad|> = 257).
CONFIG = dict(vocab_size=258, d_model=64, n_layers=2, n_heads=2)
EOS, SEP, NEWLINE = 256, ord("|"), ord("\n")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_word(rng: random.Random, lo: int = 6, hi: int = 16) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def episode(word: str) -> str:
    return f"{word}|{word}\n"


def episode_batch(rng: random.Random, batch: int, episodes: int = 4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and next-byte targets, -100 except where the byte is a copy (after '|'
    up to and including the newline). Rows are `episodes` episodes, half of them after an EOS
    (so prompts work with and without one), right-padded."""
    rows, targets = [], []
    for _ in range(batch):
        ids, tgt = [EOS] if rng.random() < 0.5 else [], []
        for _ in range(episodes):
            word = random_word(rng)
            text = list(episode(word).encode())
            copy_from = len(ids) + len(word) + 1  # index of the first copied byte
            ids += text
            tgt += [-100] * (len(ids) - 1 - len(tgt))
            tgt[copy_from - 1:] = ids[copy_from:]
        tgt.append(-100)
        rows.append(ids)
        targets.append(tgt)
    width = max(len(r) for r in rows)
    pad = [EOS] * width
    ids = torch.tensor([r + pad[len(r):] for r in rows])
    tgt = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    return ids[:, :-1], tgt[:, :-1]


def recall_model(dtype: torch.dtype = torch.float64) -> RetNetLM:
    """The trained copy model, in eval mode (float64 by default: exact comparisons)."""
    config = RetNetConfig.from_dict(json.loads((DATA / "config.json").read_text()))
    model = RetNetLM(config)
    model.load_state_dict(load_file(DATA / "model.safetensors"))
    return model.to(dtype).eval()


def copy_accuracy(model: RetNetLM, words: list[str], history: str = "",
                  zero_state: bool = False) -> float:
    """Teacher-forced accuracy of the copied letters of each word, after an optional history."""
    hits = total = 0
    for word in words:
        text = history + episode(word)
        ids = torch.tensor([[EOS, *text.encode()]])
        start = 1 + len(history.encode()) + len(word) + 1  # first copied letter
        with torch.no_grad():
            if zero_state:
                # Reads the prompt as usual but then forgets it: the copy must come from the state.
                out = model(ids[:, :start])
                state = out.state._replace(kv=tuple(torch.zeros_like(t) for t in out.state.kv))
                logits = torch.cat([out.logits[:, -1:],
                                    model(ids[:, start:-1], state=state).logits], 1)[0]
            else:
                logits = model(ids[:, :-1]).logits[0, start - 1:]
        pred = logits.argmax(-1)[:len(word)]
        hits += int((pred == ids[0, start:start + len(word)]).sum())
        total += len(word)
    return hits / total


def save_recall_run(run_dir: Path) -> Path:
    """The copy model as a `retnet train` run directory (byte tokenizer), for commands that
    load checkpoints: generate, serve, eval."""
    from retnet.checkpoint import save_checkpoint
    from retnet.tokenizer import ByteTokenizer

    model = recall_model(torch.float32)
    save_checkpoint(run_dir, 1, model.state_dict(), model.config, ByteTokenizer(),
                    {"step": 1}, {"source": "tests/recall.py"})
    return run_dir
