"""The experiment of `retnet compare`: build RetNet, the matched Transformer and the ablations
from one seed, train each with `retnet train`'s step on the same batches, then measure loss
by position up to 4× the training length and zero-shot accuracy."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from retnet.compare.baselines import document_inputs, llama_loss
from retnet.compare.config import VARIANTS, CompareConfig
from retnet.compare.report import summarise, write_report
from retnet.data import PackedWindows, load_documents, split_documents, tokenize
from retnet.device import pick_device
from retnet.memory import PeakMemory
from retnet.model import RetNetConfig, RetNetLM
from retnet.ops import CHUNKWISE
from retnet.ops.documents import document_starts
from retnet.train.step import Schedule, adamw, micro_batches, train_step, validation_loss

# Chunkwise: linear cost, so the 4× length evaluation stays cheap; equal to parallel.
FORM = CHUNKWISE


class _Adapter(torch.nn.Module):
    """ids [B, T] -> logits [B, T, vocab] and `loss`, for a model reading packed windows with
    document boundaries at each `separator` token (None: windows read as one sequence)."""

    def __init__(self, model, separator: int | None = None) -> None:
        super().__init__()
        self.model, self.separator = model, separator

    def resets(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.separator is None else document_starts(ids, self.separator)


class _LlamaAdapter(_Adapter):
    """Like the RetNet adapter; `loss` through the same chunked cross-entropy, so the two
    models differ in their architecture only (boundaries: a block-diagonal mask)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False,
                          **document_inputs(self.resets(ids))).logits

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return llama_loss(self.model, ids, targets, self.resets(ids))


class _RetNetAdapter(_Adapter):
    """In the comparison's one retention form."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mode=FORM, resets=self.resets(ids)).logits

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mode=FORM, targets=targets, resets=self.resets(ids)).loss


def build_models(cfg: CompareConfig, vocab: int, seed: int, separator: int | None = None
                 ) -> dict[str, torch.nn.Module]:
    """RetNet, the matched Llama and each variant, each initialised from `seed`; separator:
    the token at which a document starts in packed windows (None: no boundaries)."""
    from retnet.compare.baselines import matched_llama

    base = RetNetConfig(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers,
                        n_heads=cfg.retnet_heads)
    models: dict[str, torch.nn.Module] = {}
    torch.manual_seed(seed)
    models["retnet"] = _RetNetAdapter(RetNetLM(base), separator)
    torch.manual_seed(seed)
    llama = matched_llama(base, max_position_embeddings=8 * cfg.seq_len)
    models["transformer"] = _LlamaAdapter(llama, separator)
    for name in cfg.variants:
        torch.manual_seed(seed)
        models[f"retnet-{name}"] = _RetNetAdapter(RetNetLM(RetNetConfig.from_dict(
            {**base.to_dict(), **VARIANTS[name]})), separator)
    return models


def non_embedding(model: torch.nn.Module) -> int:
    """Parameters of an adapted model outside its embeddings (and a tied or untied head)."""
    inner = model.model
    if isinstance(inner, RetNetLM):
        return inner.num_parameters(embeddings=False)
    from retnet.compare.baselines import llama_non_embedding

    return llama_non_embedding(inner)


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, windows: list[torch.Tensor], buckets: int
                     ) -> list[float]:
    """Mean loss in `buckets` equal spans of position over long validation windows."""
    model.eval()
    total = None
    device = next(model.parameters()).device
    for w in windows:
        w = w.to(device)
        logits = model(w[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), w[:, 1:],
                                                reduction="none").mean(0)  # [T]
        total = nll if total is None else total + nll
    model.train()
    return [x.mean().item() for x in (total / len(windows)).chunk(buckets)]


def train_one(name: str, model: torch.nn.Module, train: PackedWindows, val: list[torch.Tensor],
              cfg: CompareConfig, seed: int, bar) -> dict[str, Any]:
    """`retnet train`'s step for every model (AdamW, warm-up + cosine, clipping, with train's
    defaults), on the batches of (seed, step): the same batches in the same order for all."""
    device = next(model.parameters()).device
    schedule = Schedule(cfg.lr, cfg.steps, cfg.warmup)
    optimizer = adamw(model, cfg.lr)
    curve, hashes, elapsed = [], [], 0.0
    meter = PeakMemory(device)
    model.train()
    for step in range(cfg.steps):
        batches = micro_batches(train, seed, step, cfg.batch_size)
        hashes.append(hashlib.sha256(batches[0].numpy().tobytes()).hexdigest()[:16])
        start = time.perf_counter()
        loss = train_step(model, optimizer, batches, schedule.lr_at(step),
                          loss_of=model.loss)
        if device.type == "cuda":  # time the work, not the kernel launches
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
                          "train_loss": loss, "val_loss": validation_loss(model, val,
                                                                          loss_of=model.loss)})
            bar.set_postfix(model=name, val=f"{curve[-1]['val_loss']:.3f}")
        bar.update(1)
    return {"curve": curve, "batch_hashes": hashes,
            "tokens_per_s": cfg.steps * cfg.batch_size * cfg.seq_len / elapsed,
            "peak_mib": meter.mib(), "non_embedding": non_embedding(model)}


def zero_shot(model: torch.nn.Module, tokenizer, tasks: str, limit: float | None) -> dict:
    """lm-eval accuracy of an adapted model on the comma-separated `tasks`."""
    from retnet.eval import run_tasks

    inner = model.model
    if not isinstance(inner, RetNetLM):
        inner = _CausalLMShim(inner)
    results = run_tasks(inner, tokenizer, tasks.split(","), limit=limit)
    return {t: {k: v for k, v in m.items() if isinstance(v, float)} for t, m in results.items()}


class _CausalLMShim(torch.nn.Module):
    """Lets the harness adapter score a transformers model: same call, logits out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.embed = model.get_input_embeddings()

    def forward(self, ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        position_ids = None
        if attention_mask is not None:  # left padding: positions from each row's first token
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        return SimpleNamespace(logits=out.logits, state=None)


def run(cfg: CompareConfig) -> dict[str, Any]:
    """The whole comparison; writes results.json, report.md and the plots to cfg.out."""
    from retnet.tokenizer import ByteTokenizer, train_bpe

    docs = load_documents(cfg.data)
    train_docs, val_docs = split_documents(docs)
    tok = (ByteTokenizer() if cfg.quick
           else train_bpe((d.text for d in train_docs), cfg.vocab_size))
    train_tokens, _ = tokenize(train_docs, tok, "compare-train")
    val_tokens, _ = tokenize(val_docs, tok, "compare-val")
    train = PackedWindows(train_tokens, cfg.seq_len, "training split")
    val = PackedWindows(val_tokens, cfg.seq_len, "validation split").evaluation_batches(
        cfg.batch_size, cfg.eval_batches)
    long_windows = PackedWindows(val_tokens, 4 * cfg.seq_len, "validation split"
                                 ).evaluation_batches(4, 2 if cfg.quick else 6)
    runs: list[dict[str, Any]] = []
    device = pick_device(cfg.device)
    n_models = 2 + len(cfg.variants)
    with tqdm(total=cfg.seeds * n_models * cfg.steps, desc="compare", unit="step") as bar:
        for seed in range(cfg.seeds):
            separator = None if cfg.no_document_boundaries else tok.eos_id
            for name, model in build_models(cfg, tok.vocab_size, seed, separator).items():
                model = model.to(device)
                result = train_one(name, model, train, val, cfg, seed, bar)
                result |= {"name": name, "seed": seed,
                           "loss_by_position": loss_by_position(model, long_windows, 8),
                           "zero_shot": zero_shot(model, tok, cfg.tasks, 4 if cfg.quick else None)}
                runs.append(result)
    results = {"config": asdict(cfg), "tokenizer_vocab": tok.vocab_size,
               "train_tokens_available": int(train_tokens.size), "runs": runs,
               "tokens_per_model": cfg.steps * cfg.batch_size * cfg.seq_len}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return results


def command(cfg: CompareConfig) -> int:
    """`retnet compare`: run it, then print one line per model and where the report is."""
    results = run(cfg)
    for name, row in summarise(results["runs"]).items():
        print(f"{name:24s} val loss {row['val_loss']:.4f}  ppl {row['val_ppl']:.2f}  "
              f"acc {row['acc']:.3f}  {row['tokens_per_s']:.0f} tokens/s")
    print(f"report: {cfg.out}/report.md")
    return 0
