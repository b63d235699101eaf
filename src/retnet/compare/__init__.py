"""`retnet compare`: RetNet against a Transformer of matched non-embedding parameters (Llama:
RoPE, RMSNorm, SwiGLU, sdpa), trained on the same tokenizer, the same batches in the same
order, the same token budget, optimiser and schedule; and the paper's ablations as options of
the one RetNet. Reports validation curves, loss by position up to 4× the training length,
zero-shot multiple-choice accuracy (lm-eval), throughput and peak memory."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from retnet.data import PackedWindows, load_documents, split_documents, tokenize
from retnet.model import RetNetConfig, RetNetLM, lm_loss
from retnet.train import TrainConfig, get_lr, param_groups

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

    d_model: int = 192  # both models; 12·d²·L ≈ 2.7M non-embedding parameters at L = 6
    n_layers: int = 6
    retnet_heads: int = 2
    steps: int = 700
    batch_size: int = 16
    seq_len: int = 256  # training length; loss by position is measured up to 4× this
    lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 100
    eval_batches: int = 8
    vocab_size: int = 4096  # BPE trained on the corpus
    data: str | None = None  # None: the stdlib corpus
    seeds: int = 1  # the whole comparison per seed; the report gives mean and spread
    variants: list[str] = field(default_factory=list)  # ablations to add (see VARIANTS)
    tasks: str = "python_mc"  # lm-eval tasks (shipped local files) for zero-shot accuracy
    out: str = "runs/compare"
    quick: bool = False  # tiny models and budget: a smoke run
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(VARIANTS)}")
        if self.quick:
            self.d_model, self.n_layers, self.steps, self.batch_size = 64, 1, 6, 4
            self.seq_len, self.warmup, self.eval_every, self.eval_batches = 32, 2, 3, 2
            self.vocab_size = 300


class _LlamaAdapter(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class _RetNetAdapter(torch.nn.Module):
    def __init__(self, model: RetNetLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # chunkwise: linear cost, so the 4× length evaluation stays cheap; equal to parallel
        return self.model(ids, mode="chunkwise", chunk_size=64).logits


def build_models(cfg: CompareConfig, vocab: int, seed: int) -> dict[str, torch.nn.Module]:
    from retnet.compare.baselines import matched_llama

    base = RetNetConfig(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers,
                        n_heads=cfg.retnet_heads)
    models: dict[str, torch.nn.Module] = {}
    torch.manual_seed(seed)
    models["retnet"] = _RetNetAdapter(RetNetLM(base))
    torch.manual_seed(seed)
    llama = matched_llama(base, max_position_embeddings=8 * cfg.seq_len)
    models["transformer"] = _LlamaAdapter(llama)
    for name in cfg.variants:
        torch.manual_seed(seed)
        models[f"retnet-{name}"] = _RetNetAdapter(RetNetLM(RetNetConfig.from_dict(
            {**base.to_dict(), **VARIANTS[name]})))
    return models


def non_embedding(model: torch.nn.Module) -> int:
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    device = next(model.parameters()).device
    out = statistics.mean(lm_loss(model(b[:, :-1].to(device)), b[:, 1:].to(device)).item()
                          for b in batches)
    model.train()
    return out


def _reset_peak() -> None:
    """Return freed heap to the system, then reset the kernel's peak-RSS counter (Linux), so
    that a model trained after another does not hide its peak in reused heap."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mib(name: str = "VmRSS") -> float:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_one(name: str, model: torch.nn.Module, train: PackedWindows, val: list[torch.Tensor],
              cfg: CompareConfig, seed: int, bar) -> dict[str, Any]:
    """The same loop for every model: AdamW, warm-up + cosine, clipping, fixed batches."""
    schedule = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, min_lr_ratio=0.1)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=cfg.lr, betas=(0.9, 0.95))
    curve, hashes, elapsed = [], [], 0.0
    device = next(model.parameters()).device
    _reset_peak()
    base = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for step in range(cfg.steps):
        batch = train.batch(seed, step, cfg.batch_size)
        hashes.append(hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16])
        batch = batch.to(device)
        for group in opt.param_groups:
            group["lr"] = get_lr(step, schedule)
        start = time.perf_counter()
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":  # time the work, not the kernel launches
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
                          "train_loss": loss.item(), "val_loss": evaluate(model, val)})
            bar.set_postfix(model=name, val=f"{curve[-1]['val_loss']:.3f}")
        bar.update(1)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _rss_mib("VmHWM") - base)  # GPU: allocator peak; CPU: resident-set peak
    return {"curve": curve, "batch_hashes": hashes,
            "tokens_per_s": cfg.steps * cfg.batch_size * cfg.seq_len / elapsed,
            "peak_mib": peak, "non_embedding": non_embedding(model)}


def zero_shot(model: torch.nn.Module, tokenizer, tasks: str, limit: float | None) -> dict:
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
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_models = 2 + len(cfg.variants)
    with tqdm(total=cfg.seeds * n_models * cfg.steps, desc="compare", unit="step") as bar:
        for seed in range(cfg.seeds):
            for name, model in build_models(cfg, tok.vocab_size, seed).items():
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
    from retnet.compare.report import write_report

    write_report(results, out)
    return results


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per model: mean and spread (min–max over seeds) of the headline figures."""
    table: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        losses = [r["curve"][-1]["val_loss"] for r in rs]
        acc = [next(iter(r["zero_shot"].values())).get("acc,none", math.nan) for r in rs]
        table[name] = {"val_loss": statistics.mean(losses), "val_loss_min": min(losses),
                       "val_loss_max": max(losses), "val_ppl": math.exp(statistics.mean(losses)),
                       "acc": statistics.mean(acc), "tokens_per_s":
                       statistics.mean(r["tokens_per_s"] for r in rs),
                       "peak_mib": max(r["peak_mib"] for r in rs),
                       "non_embedding": rs[0]["non_embedding"]}
    return table
