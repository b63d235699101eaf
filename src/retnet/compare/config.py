"""The run options of `retnet compare`, and the paper's ablations as overrides of the one RetNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retnet.device import check_device
from retnet.options import opt

# The paper's Table 6 ablations, as RetNetConfig overrides of the one model.
VARIANTS: dict[str, dict[str, Any]] = {
    "no-gate": {"use_gate": False},
    "no-groupnorm": {"head_norm": "none"},
    "no-decay": {"decays": "none"},
    "single-decay": {"decays": "single"},
    "small-heads": {"n_heads": 6},  # head dim 96 → 32 at d_model 192
}


@dataclass
class CompareConfig:
    """Run options of `retnet compare`; the defaults take about 30 minutes on two CPU cores."""

    d_model: int = opt(192, "model width of both models; 12·d²·L ≈ 2.7M non-embedding "
                       "parameters at 6 layers")
    n_layers: int = opt(6, "layers of both models")
    retnet_heads: int = opt(2, "RetNet's retention heads (the Transformer's head dim is 64)")
    steps: int = opt(700, "optimiser steps per model")
    batch_size: int = opt(16, "sequences per step")
    seq_len: int = opt(256, "training length; loss by position is measured up to 4× this")
    lr: float = opt(2e-3, "peak learning rate (AdamW, warm-up then cosine decay)")
    warmup: int = opt(50, "linear warm-up steps")
    eval_every: int = opt(100, "a point of each model's validation curve every N steps")
    eval_batches: int = opt(8, "validation batches per point (the same windows for every "
                            "model)")
    vocab_size: int = opt(4096, "size of the BPE trained on the corpus")
    data: str | None = opt(None, "text file, .jsonl, directory or glob (default: the stdlib "
                           "corpus)")
    seeds: int = opt(1, "the whole comparison once per seed; the report gives mean and spread")
    variants: list[str] = opt(help=f"ablations to add: {', '.join(VARIANTS)} (several, or "
                              "comma-separated)", factory=list, metavar="VARIANT")
    tasks: str = opt("python_mc", "lm-eval tasks for zero-shot accuracy (comma-separated; "
                     "shipped local files)")
    out: str = opt("runs/compare", "where results.json, report.md and the plots go")
    no_document_boundaries: bool = opt(False, "let the packed windows' documents see each "
                                       "other: state, attention and positions carry across "
                                       "<|endoftext|> (default: each document alone, in both "
                                       "models)")
    quick: bool = opt(False, "tiny models and budget: a smoke run")
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu)")

    def __post_init__(self) -> None:
        # --variants no-gate no-decay, or no-gate,no-decay
        self.variants = [v for item in self.variants for v in item.split(",") if v]
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(VARIANTS)}")
        check_device(self.device)
        if self.quick:
            self.d_model, self.n_layers, self.steps, self.batch_size = 64, 1, 6, 4
            self.seq_len, self.warmup, self.eval_every, self.eval_batches = 32, 2, 3, 2
            self.vocab_size = 300
