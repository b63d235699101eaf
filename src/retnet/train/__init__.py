"""`retnet train`: AdamW with warm-up and decay, accumulation, clipping, evaluation, exact resume,
DDP/FSDP2 under torchrun. Batches are a pure function of (seed, step), so resuming is exact."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from tqdm import tqdm

from retnet.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    read_latest,
    remove_orphans,
    resolve_checkpoint,
    save_checkpoint,
)
from retnet.data import PackedWindows, load_documents, split_documents, tokenize
from retnet.model import RetNetConfig, RetNetLM, lm_loss
from retnet.options import check_types, short
from retnet.tokenizer import Tokenizer, load_tokenizer
from retnet.train import distributed as dist


@dataclass
class TrainConfig:
    """Run options of `retnet train` (each is a --flag; a TOML/YAML file may set any of them)."""

    preset: str = "demo"  # model preset; vocab size comes from the tokenizer
    model: dict[str, Any] = field(default_factory=dict)  # RetNetConfig overrides
    data: str | None = None  # text file, .jsonl, directory or glob; None: the stdlib corpus
    text_field: str = "text"  # the JSONL field holding the text
    tokenizer: str = "byte"  # "byte" or a tokenizer.json
    out: str = "runs/train"  # run directory: checkpoints, metrics.jsonl, loss.png
    steps: int = 1000  # optimiser steps (the schedule's length)
    stop_at: int | None = None  # end this invocation after this step and save (resume later)
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    warmup: int = 100  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" or "linear" decay after warm-up
    weight_decay: float = 0.1  # not applied to norms, embeddings, biases
    beta2: float = 0.95
    clip: float = 1.0  # max gradient norm (0 disables)
    mode: str = "parallel"  # "parallel" or "chunkwise" (long sequences)
    chunk_size: int = 64
    dtype: str | None = None  # "float32" or "bfloat16" (autocast); default fp32 CPU, bf16 CUDA
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    resume: bool = False  # continue from OUT/latest, with the options stored in the run
    overwrite: bool = False  # start again in an OUT that holds a run (its checkpoints go)

    def __post_init__(self) -> None:
        # Values from a TOML/YAML file or --model KEY=VALUE arrive untyped: name a bad one.
        check_types(TrainConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        check_types(RetNetConfig, self.model, prefix="model.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"invalid device={short(self.device)}; use cpu, cuda, cuda:N "
                                 "or mps") from None
        checks = {"steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
                  "seq_len": self.seq_len >= 1, "grad_accum": self.grad_accum >= 1,
                  "lr": self.lr > 0, "warmup": self.warmup >= 0,
                  "schedule": self.schedule in ("cosine", "linear"),
                  "mode": self.mode in ("parallel", "chunkwise"),
                  "dtype": self.dtype in (None, "float32", "bfloat16"),
                  "parallel": self.parallel in ("ddp", "fsdp"),
                  "eval_every": self.eval_every >= 1, "save_every": self.save_every >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}; "
                                 "see `retnet train --help`")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a .toml or .yaml/.yml file; keyword overrides win."""
        return cls(**{**cls.read_file(path), **overrides})

    @staticmethod
    def stored(out: str | Path) -> dict[str, Any]:
        """The options a run in `out` was started with (its latest checkpoint's meta.json),
        less those that belong to one invocation, for `--resume` with only `--out`. Finishes
        or clears an interrupted save first, so `latest` names a complete checkpoint."""
        for line in remove_orphans(Path(out)):
            print(line, flush=True)
        meta = resolve_checkpoint(out) / "meta.json"
        try:
            options = json.loads(meta.read_text()).get("train_config", {})
        except (OSError, ValueError):
            raise ValueError(f"cannot read the stored options in {meta}; pass them again "
                             "with --resume") from None
        return {k: v for k, v in options.items() if k not in ("stop_at", "resume", "overwrite")}

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML ({str(err).splitlines()[0]})"
                                 ) from None
        else:
            raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold KEY: VALUE pairs; got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} in {path}; "
                             f"valid keys: {', '.join(sorted(known))}")
        return values


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine or linear decay to lr · min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only: not norms, embeddings or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and "embed" not in name and "lm_head" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], cfg: TrainConfig,
             device: torch.device, amp: torch.dtype | None) -> float:
    """Mean validation loss (nats per token) over fixed windows."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with _autocast(device, amp):
            out = model(batch[:, :-1], mode=cfg.mode, chunk_size=cfg.chunk_size)
        total += lm_loss(out.logits, batch[:, 1:]).item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class _Run:
    """Everything the loop needs, built once."""

    model: RetNetLM
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    train: PackedWindows
    val_batches: list[torch.Tensor]
    val_bits_per_token: float  # converts nats/token into bits per byte
    start_step: int
    meta: dict[str, Any]


def _prepare(cfg: TrainConfig, ctx: dist.Context) -> _Run:
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(resolve_checkpoint(out))
        tokenizer = ckpt.tokenizer
        config = ckpt.config
        wanted = RetNetConfig.from_preset(cfg.preset, vocab_size=config.vocab_size, **cfg.model)
        if wanted.fingerprint() != config.fingerprint():
            raise ValueError(f"{ckpt.path} was trained with another model config; resume with "
                             "the same --preset and overrides, or use a new --out")
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        config = RetNetConfig.from_preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size,
                                                         **cfg.model})
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}; drop the vocab_size override")
    docs = load_documents(cfg.data, cfg.text_field)
    train_docs, val_docs = split_documents(docs)
    with ctx.rank_zero_first():  # rank 0 tokenises and caches; the others read the cache
        train_tokens, _ = tokenize(train_docs, tokenizer, "train")
        val_tokens, val_meta = tokenize(val_docs, tokenizer, "val")
    train = PackedWindows(train_tokens, cfg.seq_len, "training split")
    val = PackedWindows(val_tokens, cfg.seq_len, "validation split")
    torch.manual_seed(cfg.seed)
    model = RetNetLM(config).to(ctx.device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
    wrapped = dist.wrap(model, ctx, cfg.parallel)
    optimizer = torch.optim.AdamW(param_groups(wrapped, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, cfg.beta2))
    start = 0
    if ckpt is not None:
        state = ckpt.train_state()
        dist.load_optimizer_state(wrapped, optimizer, state["optimizer"])
        _set_rng_state(state["rng"])
        start = state["step"]
    meta = {"python_corpus": cfg.data is None, "documents": len(docs),
            "train_tokens": int(train_tokens.size), "val_tokens": int(val_tokens.size),
            "corpus": _corpus_record(cfg, docs), "train_config": dataclasses.asdict(cfg)}
    bits = val_meta["tokens"] / max(val_meta["bytes"], 1) / math.log(2)
    return _Run(model, wrapped, optimizer, tokenizer, train,
                val.evaluation_batches(cfg.batch_size, cfg.eval_batches), bits, start, meta)


def _corpus_record(cfg: TrainConfig, docs) -> dict[str, Any]:
    from retnet.data import corpus_fingerprint, describe_default_corpus

    base = describe_default_corpus() if cfg.data is None else {"source": cfg.data}
    return {**base, "fingerprint": corpus_fingerprint(docs)}


def _save(run: _Run, cfg: TrainConfig, ctx: dist.Context, step: int) -> None:
    state = dist.full_state(run.wrapped, run.optimizer)  # a collective under FSDP
    error = None
    if ctx.is_main:
        try:
            save_checkpoint(cfg.out, step, state["model"], run.model.config, run.tokenizer,
                            {"optimizer": state["optimizer"], "step": step,
                             "rng": _rng_state()}, run.meta)
        except Exception as err:
            if ctx.world == 1:
                raise
            error = str(err) if isinstance(err, CheckpointWriteError) else (
                f"rank 0 could not save step {step}: {type(err).__name__}: {err}")
    # Every rank learns how rank 0's save went (in place of a barrier), so that a failed save
    # (a full disk) stops them all with its message instead of leaving them waiting.
    error = _rank0_outcome(ctx, error)
    if error is not None:
        raise CheckpointWriteError(error)


def _rank0_outcome(ctx: dist.Context, error: str | None) -> str | None:
    """Rank 0's error message (None: success) on every rank: one broadcast when world > 1."""
    if ctx.world == 1:
        return error
    box = [error]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train (or resume) and return the final metrics. Launch under torchrun for DDP/FSDP2."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        dist.teardown(ctx)


def _check_fresh(cfg: TrainConfig) -> None:
    """A new run never mixes with an old one in the same OUT: --resume or --overwrite."""
    out = Path(cfg.out)
    if cfg.resume or not ((out / "latest").exists() or (out / "checkpoints").exists()):
        return
    if not cfg.overwrite:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite "
                         "to start again (its checkpoints and metrics are removed), or another "
                         "--out")


def _clear_old_run(out: Path) -> None:
    for name in ("checkpoints", "latest", "metrics.jsonl", "loss.png"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _make_run_dir(out: Path, overwrite: bool) -> None:
    """Create OUT (before any slow work) and remove the temp folders of killed saves."""
    if overwrite:
        _clear_old_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the run directory {out} ({err.strerror}); "
                         "pass another --out") from None
    for line in remove_orphans(out):
        print(line, flush=True)


def _diverged(out: Path, step: int, what: str, value: float) -> str:
    latest = read_latest(out)
    good = (f"{out / 'checkpoints' / latest} (resume from it with a lower --lr or --clip, or "
            "check the data)") if latest else "none: none was saved"
    return (f"the training {what} became {value} at step {step}; stopped before the optimiser "
            f"step, saving or pruning anything; the last good checkpoint is {good}")


def _train(cfg: TrainConfig, ctx: dist.Context) -> dict[str, float]:
    out = Path(cfg.out)
    _check_fresh(cfg)  # on every rank, so that none waits for a rank that refused
    if ctx.is_main:  # only rank 0 saves, so only it may judge a temp folder orphaned
        _make_run_dir(out, cfg.overwrite and not cfg.resume)
    run = _prepare(cfg, ctx)
    amp = {"float32": None, "bfloat16": torch.bfloat16}[
        cfg.dtype or ("bfloat16" if ctx.device.type == "cuda" else "float32")]
    metrics_path = out / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ctx.world
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not ctx.is_main, unit="step",
               dynamic_ncols=True)
    result: dict[str, float] = {}
    step = run.start_step
    run.wrapped.train()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    try:
        while step < last:
            started = time.perf_counter()
            loss = _train_step(run, cfg, ctx, step, amp)
            step += 1
            rate = tokens_per_step / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            record: dict[str, Any] = {"step": step, "loss": loss, "lr": get_lr(step - 1, cfg),
                                      "tokens_per_s": rate}
            if step % cfg.eval_every == 0 or step == last:
                val = evaluate(run.wrapped, run.val_batches, cfg, ctx.device, amp)
                record |= {"val_loss": val, "val_ppl": math.exp(val),
                           "val_bpb": val * run.val_bits_per_token}
                result = {k: record[k] for k in ("loss", "val_loss", "val_ppl", "val_bpb")}
                bar.write(f"step {step}: val loss {val:.4f}, ppl {math.exp(val):.2f}, "
                          f"bits/byte {record['val_bpb']:.3f}")
            if ctx.is_main:
                _log(metrics_path, record)
            if step % cfg.save_every == 0 or step == last:
                _save(run, cfg, ctx, step)
    except KeyboardInterrupt:
        bar.write(f"interrupted: saving step {step} to {out}")
        _save(run, cfg, ctx, step)
        raise
    finally:
        bar.close()
    if ctx.is_main:
        from retnet.train.plot import plot_losses

        plot_losses(metrics_path, out / "loss.png")
    return result


def _train_step(run: _Run, cfg: TrainConfig, ctx: dist.Context, step: int,
                amp: torch.dtype | None) -> float:
    for group in run.optimizer.param_groups:
        group["lr"] = get_lr(step, cfg)
    total = 0.0
    for micro in range(cfg.grad_accum):
        batch = run.train.batch(cfg.seed, step * cfg.grad_accum + micro, cfg.batch_size,
                                ctx.rank, ctx.world).to(ctx.device)
        last = micro == cfg.grad_accum - 1
        with dist.maybe_no_sync(run.wrapped, sync=last), _autocast(ctx.device, amp):
            out = run.wrapped(batch[:, :-1], mode=cfg.mode, chunk_size=cfg.chunk_size)
            loss = lm_loss(out.logits, batch[:, 1:]) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    # The norm is measured whether or not it clips (max_norm inf scales by exactly 1).
    norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(),
                                          cfg.clip if cfg.clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    loss = ctx.mean(total)
    # A finite loss can still come with inf/NaN gradients, which would make every weight NaN:
    # stop before the optimiser step. Gradients are all-reduced, so every rank agrees.
    for what, value in (("loss", loss), ("gradient norm", float(norm))):
        if not math.isfinite(value):
            raise ValueError(_diverged(Path(cfg.out), step + 1, what, value))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss
