"""`retnet train`'s run: prepare (tokenise, build or resume), loop over `train_step`, evaluate,
log metrics.jsonl, save crash-safe checkpoints, plot. Batches are a pure function of (seed,
step), and the RNG state is saved, so resuming is exact."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from retnet.device import pick_device
from retnet.files import append_text
from retnet.model import RetNetConfig, RetNetLM
from retnet.ops.documents import document_starts
from retnet.tokenizer import Tokenizer, load_tokenizer
from retnet.train import distributed as dist
from retnet.train.config import TrainConfig
from retnet.train.sinks import MetricSinks
from retnet.train.step import (
    Data,
    Diverged,
    Loss,
    adamw,
    micro_batches,
    train_step,
    validation_loss,
)


@dataclass
class _Run:
    """Everything the loop needs, built once."""

    model: RetNetLM
    wrapped: torch.nn.Module  # the model under DDP/FSDP2 (the model itself in one process)
    loss_of: Loss  # the wrapped model's loss in the run's retention form
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    train: PackedWindows
    val_batches: list[torch.Tensor]
    val_bits_per_token: float  # converts nats/token into bits per byte
    start_step: int
    meta: dict[str, Any]
    template: dict[str, str] | None = None  # the chat template the checkpoints carry
    samples: Callable[[], list[str]] | None = None  # --sft: a few validation prompts' answers


def _model_and_tokenizer(cfg: TrainConfig):
    """(config, tokenizer, checkpoint or None): from OUT's latest checkpoint with --resume."""
    if not cfg.resume:
        tokenizer = load_tokenizer(cfg.tokenizer)
        config = RetNetConfig.from_preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size,
                                                         **cfg.model})
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}; drop the vocab_size override")
        return config, tokenizer, None
    ckpt = load_checkpoint(resolve_checkpoint(cfg.out))
    # a fine-tuned run's config came from its --init-from source, not --preset
    base = (ckpt.config if cfg.init_from else RetNetConfig.from_preset(cfg.preset)).to_dict()
    wanted = RetNetConfig.from_dict({**base, "vocab_size": ckpt.config.vocab_size, **cfg.model})
    if wanted.fingerprint() != ckpt.config.fingerprint():
        raise ValueError(f"{ckpt.path} was trained with another model config; resume with "
                         "the same --preset and overrides, or use a new --out")
    return ckpt.config, ckpt.tokenizer, ckpt


def _text_data(cfg: TrainConfig, tokenizer: Tokenizer, ctx: dist.Context) -> Data:
    if cfg.data is not None:  # streamed into shards and read through them (retnet.corpus)
        from retnet.train.corpus_data import corpus_data

        return corpus_data(cfg, tokenizer, ctx)
    docs = load_documents(cfg.data, cfg.text_field)
    train_docs, val_docs = split_documents(docs)
    with ctx.rank_zero_first():  # rank 0 tokenises and caches; the others read the cache
        train_tokens, _ = tokenize(train_docs, tokenizer, "train")
        val_tokens, val_meta = tokenize(val_docs, tokenizer, "val")
    train = PackedWindows(train_tokens, cfg.seq_len, "training split")
    val = PackedWindows(val_tokens, cfg.seq_len, "validation split")
    meta = {"python_corpus": cfg.data is None, "documents": len(docs),
            "train_tokens": int(train_tokens.size), "val_tokens": int(val_tokens.size),
            "corpus": _corpus_record(cfg, docs)}
    bits = val_meta["tokens"] / max(val_meta["bytes"], 1) / math.log(2)
    form = cfg.form
    # a document starts at each <|endoftext|> of a window, unless the run opts out
    separator = None if cfg.no_document_boundaries else tokenizer.eos_id

    def loss(wrapped: torch.nn.Module) -> Loss:
        def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            resets = None if separator is None else document_starts(ids, separator)
            return wrapped(ids, mode=form, targets=targets, resets=resets).loss  # DDP's forward
        return loss_of

    return Data(train, val.evaluation_batches(cfg.batch_size, cfg.eval_batches), bits, meta,
                loss)


def _prepare(cfg: TrainConfig, ctx: dist.Context) -> _Run:
    config, tokenizer, ckpt = _model_and_tokenizer(cfg)
    tuned = None
    if cfg.init_from or cfg.sft or cfg.lora_rank:  # `finetune_run`: source, template, SFT
        from retnet.train.finetune_run import Tuning

        tuned = Tuning.of(cfg, config, tokenizer, ckpt)
        config, tokenizer = tuned.config, tuned.tokenizer
    data = tuned.data(cfg, ctx) if tuned and cfg.sft else _text_data(cfg, tokenizer, ctx)
    torch.manual_seed(cfg.seed)
    model = RetNetLM(config)
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
    elif tuned is not None:
        tuned.load(model)
    model = model.to(ctx.device)
    model.activation_checkpointing = cfg.activation_checkpointing
    wrapped = dist.wrap(model, ctx, cfg.parallel)
    optimizer = adamw(wrapped, cfg.lr, cfg.weight_decay, cfg.beta2)
    start = 0
    if ckpt is not None:
        state = ckpt.train_state()
        dist.load_optimizer_state(wrapped, optimizer, state["optimizer"])
        _set_rng_state(state["rng"])
        start = state["step"]
    meta = {**data.meta, **(tuned.meta() if tuned else {}),
            "train_config": cfg.stored_options()}
    return _Run(model, wrapped, data.loss(wrapped), optimizer, tokenizer, data.train,
                data.val_batches, data.bits_per_token, start, meta,
                tuned.template if tuned else None,
                tuned.sampler(model) if tuned else None)


def startup_summary(run: _Run, cfg: TrainConfig, ctx: dist.Context, amp: torch.dtype | None,
                    per_step: int) -> str:
    """One line before the first step: what trains, where, on how much (per_step: tokens per
    optimiser step over every process), for how long."""
    params = sum(p.numel() for p in run.model.parameters())
    epochs = per_step * (cfg.steps - run.start_step) / max(run.train.tokens.size, 1)
    where = f"{ctx.device}" + (f" × {ctx.world} processes ({cfg.parallel})" if ctx.world > 1
                               else "")
    start = f"resuming at step {run.start_step}" if run.start_step else "from step 0"
    return (f"train: {params / 1e6:.2f}M parameters ({cfg.preset}, {cfg.mode} form) on {where}, "
            f"{'bfloat16 autocast' if amp is not None else 'float32'}; "
            f"{run.meta['documents']:,} documents, {run.meta['train_tokens']:,} train + "
            f"{run.meta['val_tokens']:,} validation tokens; {cfg.steps:,} steps of "
            f"{per_step:,} tokens ({epochs:.2f} epochs), {start}; writing {cfg.out}")


def _corpus_record(cfg: TrainConfig, docs) -> dict[str, Any]:
    from retnet.data import corpus_fingerprint, describe_default_corpus

    base = describe_default_corpus() if cfg.data is None else {"source": cfg.data}
    return {**base, "fingerprint": corpus_fingerprint(docs)}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if pick_device().type == "cuda":  # dropout on a GPU draws from its own generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and pick_device().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def _save(run: _Run, cfg: TrainConfig, ctx: dist.Context, step: int) -> None:
    state = dist.full_state(run.wrapped, run.optimizer)  # a collective under FSDP
    error = None
    if ctx.is_main:
        try:
            _check_finite(state, cfg, step)
            weights = state["model"]
            if cfg.lora_rank:  # checkpoints hold a plain model (`finetune_run.save_weights`)
                from retnet.train.finetune_run import save_weights

                weights = save_weights(run.model, cfg)
            save_checkpoint(cfg.out, step, weights, run.model.config, run.tokenizer,
                            {"optimizer": state["optimizer"], "step": step,
                             "rng": _rng_state()}, run.meta, chat_template=run.template)
        except Exception as err:
            if ctx.world == 1:
                raise
            error = str(err) if isinstance(err, (CheckpointWriteError, NonFinite)) else (
                f"rank 0 could not save step {step}: {type(err).__name__}: {err}")
    # Every rank learns how rank 0's save went (in place of a barrier), so that a failed save
    # (a full disk) stops them all with its message instead of leaving them waiting.
    error = dist.rank0_outcome(ctx, error)
    if error is not None:
        raise CheckpointWriteError(error)


class NonFinite(ValueError):
    """The weights or optimiser state to be saved hold inf or NaN; nothing was saved."""


def _check_finite(state: dict[str, Any], cfg: TrainConfig, step: int) -> None:
    """A checkpoint with non-finite weights would be kept as the latest and push a good one
    out (only the newest are kept), so the run stops before saving one."""
    bad = _first_non_finite(state)
    if bad is not None:
        raise NonFinite(f"the training state became non-finite by step {step} ({bad} holds "
                        f"inf or NaN; a too high --lr?); stopped without saving it; the last "
                        f"good checkpoint is {_last_good(cfg)}")


def _first_non_finite(tree: Any, name: str = "") -> str | None:
    """The name of the first floating tensor in a nested dict/list holding inf or NaN."""
    if isinstance(tree, torch.Tensor):
        ok = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if ok else name
    items = tree.items() if isinstance(tree, dict) else (
        enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    for key, value in items:
        bad = _first_non_finite(value, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def _last_good(cfg: TrainConfig) -> str:
    """The latest checkpoint of the run, and what to do with it, for a message that stops
    the run; every saved checkpoint is finite, so the latest one is good."""
    latest = read_latest(cfg.out)
    return (f"{Path(cfg.out) / 'checkpoints' / latest} (resume from it with a lower --lr or "
            "--clip, or check the data)") if latest else "none: none was saved"


def _log(path: Path, record: dict[str, Any]) -> None:
    append_text(path, json.dumps(record) + "\n")


def _check_fresh(cfg: TrainConfig) -> None:
    """A new run never mixes with an old one in the same OUT: --resume or --overwrite."""
    out = Path(cfg.out)
    if cfg.resume or not ((out / "latest").exists() or (out / "checkpoints").exists()):
        return
    if not cfg.overwrite:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, --overwrite "
                         "to start again (its checkpoints and metrics are removed), or another "
                         "--out")


def _make_run_dir(out: Path, overwrite: bool) -> None:
    """Create OUT (before any slow work) and remove the temp folders of killed saves."""
    if overwrite:
        for name in ("checkpoints", "latest", "metrics.jsonl", "loss.png", "tensorboard"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the run directory {out} ({err.strerror}); "
                         "pass another --out") from None
    for line in remove_orphans(out):
        print(line, flush=True)


def _step(run: _Run, cfg: TrainConfig, ctx: dist.Context, step: int,
          amp: torch.dtype | None) -> float:
    """Optimiser step `step` (0-based) of the run; a divergence names the last good save."""
    batches = micro_batches(run.train, cfg.seed, step, cfg.batch_size, cfg.grad_accum, ctx)
    try:
        return train_step(run.wrapped, run.optimizer, batches, cfg.lr_schedule.lr_at(step),
                          loss_of=run.loss_of, clip=cfg.clip, amp=amp, ctx=ctx)
    except Diverged as err:
        raise ValueError(f"{err} at step {step + 1}; stopped before the optimiser step, "
                         "saving or pruning anything; the last good checkpoint is "
                         f"{_last_good(cfg)}") from None


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train (or resume) and return the final metrics (loss, val_loss, val_ppl, val_bpb).
    Launch under torchrun for DDP/FSDP2."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        dist.teardown(ctx)


def _train(cfg: TrainConfig, ctx: dist.Context) -> dict[str, float]:
    out = Path(cfg.out)
    _check_fresh(cfg)  # on every rank, so that none waits for a rank that refused
    if cfg.eval_tasks is not None:  # an unknown task is refused before any work too
        from retnet.train.eval_tasks import check_tasks

        check_tasks(cfg.task_names)
    if ctx.is_main:  # only rank 0 saves, so only it may judge a temp folder orphaned
        _make_run_dir(out, cfg.overwrite and not cfg.resume)
    run = _prepare(cfg, ctx)
    amp = cfg.amp(ctx.device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ctx.world
    if ctx.is_main:
        print(startup_summary(run, cfg, ctx, amp, tokens_per_step), file=sys.stderr,
              flush=True)
    result: dict[str, float] = {}
    step, last = run.start_step, min(cfg.steps, cfg.stop_at or cfg.steps)
    if step >= last and ctx.is_main:  # before the bar, or it shares the bar's line
        print(_complete(cfg, step), file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not ctx.is_main, unit="step",
               dynamic_ncols=True)
    run.wrapped.train()
    sinks = MetricSinks(out, cfg.stored_options()) if ctx.is_main else None
    try:
        while step < last:
            started = time.perf_counter()
            loss = _step(run, cfg, ctx, step, amp)
            step += 1
            rate = tokens_per_step / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            record: dict[str, Any] = {"step": step, "loss": loss,
                                      "lr": cfg.lr_schedule.lr_at(step - 1), "tokens_per_s": rate}
            if step % cfg.eval_every == 0 or step == last:
                val = validation_loss(run.wrapped, run.val_batches, loss_of=run.loss_of, amp=amp,
                                      device=ctx.device)
                record |= {"val_loss": val, "val_ppl": math.exp(val),
                           "val_bpb": val * run.val_bits_per_token}
                result = {k: record[k] for k in ("loss", "val_loss", "val_ppl", "val_bpb")}
                if ctx.is_main:  # tqdm.write prints whatever the bar's `disable` says
                    bar.write(f"step {step}: val loss {val:.4f}, ppl {math.exp(val):.2f}, "
                              f"bits/byte {record['val_bpb']:.3f}")
                if run.samples is not None and ctx.is_main:
                    record["samples"] = run.samples()
                    bar.write("\n".join(f"  sample: {line}" for line in record["samples"]))
            if cfg.tasks_due(step, last):
                record |= _task_metrics(run, cfg, ctx, bar, step)
            if ctx.is_main:
                _log(out / "metrics.jsonl", record)
                sinks.log(record)
            if step % cfg.save_every == 0 or step == last:
                _save(run, cfg, ctx, step)
    except KeyboardInterrupt:
        bar.write(f"interrupted: saving step {step} to {out}")
        _save(run, cfg, ctx, step)
        raise
    finally:
        bar.close()
        if sinks is not None:
            sinks.close()
    if ctx.is_main:
        from retnet.train.plot import plot_losses

        plot_losses(out / "metrics.jsonl", out / "loss.png")
    return result


def _task_metrics(run: _Run, cfg: TrainConfig, ctx: dist.Context, bar: tqdm,
                  step: int) -> dict[str, float]:
    """--eval-tasks on the model as it is after `step`, on every process (a sharded model's
    forward is a collective); rank 0 prints them."""
    from retnet.train.eval_tasks import task_metrics

    metrics = task_metrics(run.model, run.tokenizer, cfg.task_names, cfg.eval_tasks_limit)
    if ctx.is_main:
        bar.write(f"step {step}: " + ", ".join(f"{key.removeprefix('eval/')} {value:.4f}"
                                               for key, value in metrics.items()))
    return metrics


def _complete(cfg: TrainConfig, step: int) -> str:
    """What a resumed run that has nothing left to do says, and how to extend it."""
    if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
        return (f"{cfg.out} is already at step {step} (--stop-at {cfg.stop_at}): nothing to "
                "train; resume without --stop-at, or with a later one, to go on")
    return (f"{cfg.out} is complete: it has trained all {cfg.steps} steps; to train further, "
            f"resume with more steps: retnet train --out {cfg.out} --resume --steps "
            f"{2 * cfg.steps}")


def command(cfg: TrainConfig) -> int:
    """`retnet train`: train, then print the final metrics as one JSON line (none when a
    resumed run had nothing left to train; under torchrun, from rank 0 only)."""
    result = train(cfg)
    if result and dist.main_process():
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return 0
