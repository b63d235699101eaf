"""Fine-tuning a trained model (`retnet train --init-from`): its weights, config, tokenizer and
chat template taken from a run, a checkpoint or a `retnet export --hf` folder (a converted
torchscale run is a run); the chat template's special tokens added to the tokenizer with
embedding rows grown; LoRA adapters on top; the lineage recorded in the run's metadata.

Only weights travel: the optimiser, schedule and step start afresh in a new --out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retnet.model import RetNetConfig, RetNetLM
from retnet.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    byte_tokenizer_json,
    load_chat_template,
    read_chat_template,
)


@dataclass
class Source:
    """What `--init-from` gives: a model's config, weights, tokenizer and chat template."""

    path: Path
    kind: str  # "checkpoint" or "hf"
    config: RetNetConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    template: dict[str, str]
    meta: dict[str, Any]


def load_source(path: str | Path) -> Source:
    """A run directory (its latest checkpoint), a checkpoint folder or an exported HF folder."""
    from retnet.checkpoint import load_checkpoint
    from retnet.loading import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-from {path}: no such run, checkpoint or folder")
    if (path / "config.json").is_file() and (path / "generation_config.json").is_file():
        model, tok = load(path)
        meta = _card_meta(path)
        return Source(path, "hf", model.config, model.state_dict(), tok,
                      load_chat_template(path), meta)
    ckpt = load_checkpoint(path)
    return Source(ckpt.path, "checkpoint", ckpt.config, ckpt.weights, ckpt.tokenizer,
                  ckpt.chat_template or load_chat_template(ckpt.path), ckpt.meta)


def _card_meta(path: Path) -> dict[str, Any]:
    """An exported folder keeps no meta.json; its config.json's fingerprint stands in."""
    return {"exported_folder": str(path)}


def fine_tuned_config(source: RetNetConfig, overrides: dict[str, Any]) -> RetNetConfig:
    """The source's config with `overrides` that leave the weights' shapes alone (dropout);
    one line naming the first override that would change them."""
    config = RetNetConfig.from_dict({**source.to_dict(), **overrides})
    if config.fingerprint() != source.fingerprint():
        changed = [k for k, v in overrides.items() if source.to_dict().get(k) != v
                   and k != "dropout"]
        raise ValueError(f"--model {changed[0]}={overrides[changed[0]]} changes the shape of the "
                         f"weights of --init-from (it has {changed[0]}="
                         f"{source.to_dict()[changed[0]]}); only dropout may change")
    return config


def add_special_tokens(tokenizer: Tokenizer, tokens: list[str]) -> Tokenizer:
    """`tokenizer` with each of `tokens` it does not already hold as one id added as a special
    token (after every existing id); the byte tokenizer becomes the equivalent BPE file (the
    same ids for every byte) to hold them. Returns `tokenizer` itself when none is missing."""
    from tokenizers import Tokenizer as HFTokenizer

    inner = (HFTokenizer.from_str(byte_tokenizer_json()) if isinstance(tokenizer, ByteTokenizer)
             else HFTokenizer.from_str(tokenizer.tok.to_str()))
    missing = [t for t in tokens if inner.token_to_id(t) is None]
    if not missing:
        return tokenizer
    inner.add_special_tokens(missing)
    return BPETokenizer(inner)


@torch.no_grad()
def grow_vocab(config: RetNetConfig, weights: dict[str, torch.Tensor], vocab: int
               ) -> tuple[RetNetConfig, dict[str, torch.Tensor]]:
    """(config, weights) with room for `vocab` tokens: new embedding (and untied head) rows
    set to the mean of the existing rows, so a new token starts as an average one and the
    logits of existing tokens on existing inputs stay exactly as they were. A tied head stays
    the embedding (one tensor)."""
    if vocab <= config.vocab_size:
        return config, weights
    weights = dict(weights)
    for name in ("embed.weight", "lm_head.weight"):
        if name in weights:
            old = weights[name]
            mean = old.float().mean(0, keepdim=True).to(old.dtype)
            weights[name] = torch.cat([old, mean.expand(vocab - old.shape[0], -1)])
    return RetNetConfig.from_dict({**config.to_dict(), "vocab_size": vocab}), weights


def chat_template(option: str | None, source: Source | None, fallback: dict[str, str]
                  ) -> dict[str, str]:
    """--chat-template FILE, else the source's template, else `fallback` (the run's own)."""
    if option:
        return read_chat_template(option)
    return source.template if source is not None else fallback


def lineage(source: Source) -> dict[str, Any]:
    """meta.json's `init_from`: where the weights came from, and that source's own lineage."""
    record = {"source": str(source.path), "kind": source.kind,
              "step": source.meta.get("step"), "config_fingerprint": source.config.fingerprint()}
    parent = source.meta.get("init_from")
    if parent:
        record["parent"] = parent
    return {k: v for k, v in record.items() if v is not None}


def build(source: Source, config: RetNetConfig, vocab: int) -> RetNetLM:
    """The model to fine-tune: `source`'s weights in `config`, grown to `vocab` tokens."""
    config, weights = grow_vocab(config, source.weights, vocab)
    model = RetNetLM(config)
    model.load_state_dict(weights)
    return model


def sample_lines(model: RetNetLM, tokenizer: Tokenizer, prompts: list[list[int]],
                 new_tokens: int = 48) -> list[str]:
    """Greedy continuations of `prompts` (token ids), one printable line each; the model is put
    back in training mode after."""
    from retnet.generation import generate

    lines = []
    model.eval()
    with torch.no_grad():
        for ids in prompts:
            out = generate(model, torch.tensor([ids], device=model.embed.weight.device),
                           new_tokens, eos_token_id=tokenizer.eos_id)
            text = tokenizer.decode(out[0, len(ids):].tolist())
            lines.append(json.dumps(text)[:200])
    model.train()
    return lines
