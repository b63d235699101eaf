"""How `retnet train` sets up a fine-tuning run (--init-from, --sft, --lora-rank): the model's
config, tokenizer and chat template, its starting weights and adapters, the chat data, the
metadata (lineage) and the weights each checkpoint holds. `train.loop` calls it; the step,
evaluation and saving stay the loop's own."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retnet.adapter import ADAPTER_FILE, save_adapter
from retnet.model import RetNetConfig, RetNetLM
from retnet.modules.lora import add_lora, merged_state_dict, parse_targets
from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from retnet.train import distributed as dist
from retnet.train import sft
from retnet.train.config import TrainConfig
from retnet.train.finetune import (
    Source,
    add_special_tokens,
    chat_template,
    fine_tuned_config,
    grow_vocab,
    lineage,
    load_source,
    sample_lines,
)
from retnet.train.step import Data


@dataclass
class Tuning:
    """A fine-tuning run's model description, decided once before the model is built."""

    cfg: TrainConfig
    config: RetNetConfig
    tokenizer: Tokenizer
    template: dict[str, str]
    source: Source | None  # None when resuming (the checkpoint holds everything)
    origin: dict[str, Any] | None  # meta.json's init_from
    prompts: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: TrainConfig, config: RetNetConfig, tokenizer: Tokenizer, ckpt
           ) -> Tuning:
        """From --init-from (or the fresh config and tokenizer), or from the checkpoint a
        --resume continues (`ckpt`), which already holds the grown tokenizer and template."""
        if ckpt is not None:
            return cls(cfg, ckpt.config, ckpt.tokenizer,
                       ckpt.chat_template or dict(DEFAULT_CHAT_TEMPLATE), None,
                       ckpt.meta.get("init_from"))
        source = load_source(cfg.init_from) if cfg.init_from else None
        if source is not None:
            config, tokenizer = fine_tuned_config(source.config, cfg.model), source.tokenizer
        template = chat_template(cfg.chat_template, source, dict(DEFAULT_CHAT_TEMPLATE))
        if cfg.sft:  # each role marker one token, as the template's author meant
            tokenizer = add_special_tokens(tokenizer, sft.special_tokens(template))
        if tokenizer.vocab_size > config.vocab_size:
            config = RetNetConfig.from_dict({**config.to_dict(),
                                             "vocab_size": tokenizer.vocab_size})
        return cls(cfg, config, tokenizer, template, source,
                   lineage(source) if source is not None else None)

    def load(self, model: RetNetLM) -> None:
        """The source's weights (grown to the vocabulary) into `model`, then the adapters."""
        if self.source is not None:
            _, weights = grow_vocab(self.source.config, self.source.weights,
                                    self.config.vocab_size)
            model.load_state_dict(weights)
        if self.cfg.lora_rank:
            add_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha,
                     parse_targets(self.cfg.lora_targets))

    def data(self, cfg: TrainConfig, ctx: dist.Context):
        """The chat data as rows (`retnet.train.sft`), and a few validation prompts."""
        convs = sft.read_conversations(cfg.data)
        train_c, val_c = sft.split(convs)
        rows = [sft.chat_rows(c, self.tokenizer, self.template, cfg.seq_len, cfg.sft_long,
                              cfg.sft_pack, what) for c, what in ((train_c, "training split"),
                                                                  (val_c, "validation split"))]
        self.prompts = sft.sample_prompts(val_c, self.tokenizer, self.template)
        meta = {"documents": len(convs), "train_conversations": len(train_c),
                "val_conversations": len(val_c), "train_tokens": int(rows[0].rows.numel()),
                "val_tokens": int(rows[1].rows.numel()),
                "corpus": {"source": str(cfg.data), "format": "chat",
                           "sha256": hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()[:16]}}
        form = cfg.form
        return Data(rows[0], rows[1].evaluation_batches(cfg.batch_size, cfg.eval_batches),
                    self._bits_per_token(rows[1]), meta, lambda w: sft.loss_fn(w, form))

    def _bits_per_token(self, rows: sft.ChatRows) -> float:
        """Trained tokens per byte of their text, over ln 2: nats/token → bits per byte."""
        flat = rows.rows.flatten()
        trained = (flat[1:][(flat[1:] & sft.TARGET) != 0] & sft.ID_BITS).tolist()
        text = self.tokenizer.decode(trained).encode("utf-8")
        return len(trained) / max(len(text), 1) / math.log(2)

    def meta(self) -> dict[str, Any]:
        """meta.json's lineage and fine-tuning record (the model card shows both)."""
        cfg = self.cfg
        lora = ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
                 "save": cfg.lora_save} if cfg.lora_rank else None)
        record = {"finetune": {"sft": cfg.sft, "lora": lora}}
        if self.origin is not None:
            record["init_from"] = self.origin
        return record

    def sampler(self, model: RetNetLM) -> Callable[[], list[str]] | None:
        """--sft: greedy answers to the first validation prompts, for each evaluation."""
        if not (self.cfg.sft and self.prompts):
            return None
        return lambda: sample_lines(model, self.tokenizer, self.prompts)


def save_weights(model: RetNetLM, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a LoRA run's checkpoint holds: merged (the default), or the base weights
    with the adapter written to OUT/adapter.safetensors for `--adapter`."""
    if cfg.lora_save == "merged":
        return merged_state_dict(model)
    save_adapter(model, Path(cfg.out) / ADAPTER_FILE)
    return {k: v for k, v in model.state_dict().items()
            if not k.endswith((".lora_A", ".lora_B"))}
