"""The run options of `retnet train` (one dataclass; each field is a --flag and a key of a
TOML/YAML file), and how the command line's values become them: file, stored run, flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retnet.checkpoint import remove_orphans, resolve_checkpoint
from retnet.device import check_device
from retnet.model import RetNetConfig
from retnet.ops import DEFAULT_CHUNK_SIZE, Form
from retnet.options import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    check_options,
    check_types,
    opt,
    require,
)
from retnet.train.step import BETA2, MAX_GRAD_NORM, MIN_LR_RATIO, WEIGHT_DECAY, Schedule

# Recurrent is for decoding: one token at a time would make training T times slower.
_TRAINING_MODES = ("parallel", "chunkwise")
# Options of one invocation: a resumed run takes them from the command line, never the store.
_PER_INVOCATION = ("config", "stop_at", "resume", "overwrite")
# AdamW's β₂: torch refuses 1 (the second moment would never move), and only after setup.
_BETA = Range(0, 1, high_open=True)


@dataclass
class TrainConfig:
    """Run options of `retnet train` (each is a --flag; a TOML/YAML file may set any of them)."""

    config: str | None = opt(None, "a .toml or .yaml file of these options (flags given "
                             "beside it win); command line only", metavar="FILE")
    preset: str = opt("demo", "model preset (see `retnet info`); the vocabulary size comes "
                      "from the tokenizer")
    model: dict[str, Any] = opt(help="RetNetConfig overrides, e.g. n_layers=4 dropout=0.1",
                                factory=dict)
    data: str | None = opt(None, "text files, .jsonl(.gz/.zst), .parquet, a datasets folder, a "
                           "directory, a glob or a prepared corpus (default: the Python "
                           "standard library corpus)")
    text_field: str = opt("text", "the JSONL field (Parquet, datasets column) holding the text")
    val_data: str | None = opt(None, "validation data (same forms as --data); default: the "
                               "tail of --data, --val-fraction of its tokens")
    val_fraction: float = opt(0.02, "share of --data's tokens held out for validation "
                              "(whole documents from its end)", bounds=Range(0, 1, True, True))
    workers: int | None = opt(None, "processes tokenising --data (default: the core count)",
                              bounds=AT_LEAST_ONE)
    tokenizer: str = opt("byte", '"byte" or a tokenizer.json (`retnet tokenizer train`)')
    out: str = opt("runs/train", "run directory: checkpoints, metrics.jsonl, loss.png")
    steps: int = opt(1000, "optimiser steps (the schedule's length)", bounds=AT_LEAST_ONE)
    stop_at: int | None = opt(None, "end this invocation after this step and save (resume "
                              "later with --resume)", bounds=AT_LEAST_ONE)
    batch_size: int = opt(8, "sequences per micro-batch per process", bounds=AT_LEAST_ONE)
    seq_len: int = opt(256, "training window length in tokens", bounds=AT_LEAST_ONE)
    grad_accum: int = opt(1, "micro-batches per optimiser step (gradient accumulation)",
                          bounds=AT_LEAST_ONE)
    lr: float = opt(1e-3, "peak learning rate (AdamW)", bounds=POSITIVE)
    min_lr_ratio: float = opt(MIN_LR_RATIO, "final learning rate as a fraction of --lr",
                              bounds=FRACTION)
    warmup: int = opt(100, "linear warm-up steps", bounds=NON_NEGATIVE)
    schedule: str = opt("cosine", "decay after warm-up", choices=("cosine", "linear"))
    weight_decay: float = opt(WEIGHT_DECAY, "AdamW weight decay, on the linear layers' "
                              "matrices only (not norms, embeddings, biases)",
                              bounds=NON_NEGATIVE)
    beta2: float = opt(BETA2, "AdamW's second-moment decay β₂", bounds=_BETA)
    clip: float = opt(MAX_GRAD_NORM, "max gradient norm (0 disables clipping)",
                      bounds=NON_NEGATIVE)
    mode: str = opt("parallel", "retention form: parallel, or chunkwise for long sequences",
                    choices=_TRAINING_MODES)
    chunk_size: int = opt(DEFAULT_CHUNK_SIZE, "chunk length of the chunkwise form",
                          bounds=AT_LEAST_ONE)
    dtype: str | None = opt(None, "float32, or bfloat16 (autocast); default float32 on CPU, "
                            "bfloat16 on CUDA", choices=("float32", "bfloat16"))
    activation_checkpointing: bool = opt(False, "recompute each block in backward (less "
                                         "memory, about a third more compute)")
    no_document_boundaries: bool = opt(False, "let packed windows' documents see each other: "
                                       "the state and positions carry across <|endoftext|> "
                                       "(default: each document alone, in training and "
                                       "validation)")
    eval_every: int = opt(100, "evaluate the validation loss every N steps",
                          bounds=AT_LEAST_ONE)
    eval_batches: int = opt(8, "fixed validation batches per evaluation", bounds=AT_LEAST_ONE)
    eval_tasks: str | None = opt(None, "comma-separated lm-eval tasks (e.g. retnet_mc) run on "
                                 "the model as it trains, each task's main metric logged as "
                                 "eval/TASK/METRIC (the eval extra)", metavar="TASKS")
    eval_tasks_every: int | None = opt(None, "run --eval-tasks every N steps (default: at each "
                                       "evaluation, --eval-every)", bounds=AT_LEAST_ONE)
    eval_tasks_limit: int = opt(100, "documents per task at each run of --eval-tasks",
                                bounds=AT_LEAST_ONE)
    save_every: int = opt(200, "save a checkpoint every N steps (the two newest are kept)",
                          bounds=AT_LEAST_ONE)
    seed: int = opt(0, "seed of the initial weights and of the batch order", bounds=SEED)
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu)")
    parallel: str = opt("ddp", 'under torchrun: "ddp", or "fsdp" (FSDP2 fully_shard)',
                        choices=("ddp", "fsdp"))
    init_from: str | None = opt(None, "fine-tune: start from the weights, config, tokenizer "
                                "and chat template of a run, checkpoint or `export --hf` "
                                "folder (new optimiser, schedule and step 0; --preset and "
                                "--tokenizer are not used)", metavar="SOURCE")
    sft: bool = opt(False, "--data is a chat .jsonl ({\"messages\": [...]} or prompt/"
                    "completion records): the loss on the assistant's tokens only")
    chat_template: str | None = opt(None, "chat template file for --sft (default: the "
                                    "source's)", metavar="FILE")
    sft_long: str = opt("truncate", "a conversation longer than --seq-len + 1 tokens",
                        choices=("truncate", "refuse"))
    sft_pack: bool = opt(False, "pack several conversations per row (each read alone "
                         "through document boundaries) instead of one per row with padding")
    lora_rank: int = opt(0, "LoRA rank on the --lora-targets projections, the rest frozen "
                         "(0: full fine-tuning)", bounds=NON_NEGATIVE)
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is (alpha/rank)·B·A",
                            bounds=POSITIVE)
    lora_targets: str = opt("q,k,v,g,o,ffn", "comma-separated projections for LoRA: q, k, v, "
                            "g (gate), o (output), ffn (up, gate, down)")
    lora_save: str = opt("merged", "what checkpoints hold under LoRA: merged weights, or the "
                         "base weights with OUT/adapter.safetensors beside (for --adapter)",
                         choices=("merged", "adapter"))
    resume: bool = opt(False, "continue from OUT/latest, with the options stored in the run "
                       "(flags given again win)")
    overwrite: bool = opt(False, "start again in an OUT that holds a run (its checkpoints and "
                          "metrics go)")

    def __post_init__(self) -> None:
        # Values from a TOML/YAML file or --model KEY=VALUE arrive untyped: name a bad one,
        # and one out of its range (--lr inf, --eval-batches 0) before any work.
        check_options(self)
        check_types(RetNetConfig, self.model, prefix="model.")
        if self.config is not None:
            raise ValueError("config names a file for the command line; in Python use "
                             "TrainConfig.from_file(path, **overrides)")
        check_device(self.device)
        check_finetune(self)
        if self.eval_tasks is not None:
            require("eval", "lm_eval")
        elif self.eval_tasks_every is not None:
            raise ValueError("--eval-tasks-every applies to --eval-tasks; none given")

    @property
    def form(self) -> Form:
        """The retention form of every forward pass of the run."""
        return Form(self.mode, self.chunk_size)

    @staticmethod
    def form_fields(form: Form) -> dict[str, Any]:
        """The mode and chunk_size options that give `form`: TrainConfig(**form_fields(f))."""
        return {"mode": form.mode, "chunk_size": form.chunk_size}

    @property
    def task_names(self) -> list[str]:
        """The --eval-tasks, in order ([] without them)."""
        return [] if self.eval_tasks is None else self.eval_tasks.split(",")

    def tasks_due(self, step: int, last: int) -> bool:
        """Whether --eval-tasks run after `step` (1-based) of a run ending at `last`."""
        every = self.eval_tasks_every or self.eval_every
        return self.eval_tasks is not None and (step % every == 0 or step == last)

    @property
    def lr_schedule(self) -> Schedule:
        return Schedule(self.lr, self.steps, self.warmup, self.min_lr_ratio, self.schedule)

    def amp(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on `device`: None (float32) or bfloat16."""
        name = self.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        return {"float32": None, "bfloat16": torch.bfloat16}[name]

    def stored_options(self) -> dict[str, Any]:
        """The options a checkpoint records (meta.json's train_config); not `config`, which
        only said where they were read from."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}

    @classmethod
    def from_cli(cls, values: dict[str, Any]) -> TrainConfig:
        """The options of a command line (`values`: the flags given): those of the --config
        file under the flags, and with --resume the run's stored options under both."""
        values = dict(values)
        path = values.pop("config", None)
        values = {**(cls.read_file(path) if path else {}), **values}
        if values.get("resume"):
            values = {**cls.stored(values.get("out", cls.out)), **values}
        return cls(**values)

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
        return {k: v for k, v in options.items() if k not in _PER_INVOCATION}

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The KEY: VALUE pairs of a .toml or .yaml/.yml file, keys checked (not `config`)."""
        path = Path(path)
        values = _parse(path)
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold KEY: VALUE pairs; got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} in {path}; "
                             f"valid keys: {', '.join(sorted(known))}")
        return values


def check_finetune(cfg: TrainConfig) -> None:
    """The fine-tuning options that only make sense together, before any work."""
    from retnet.modules.lora import parse_targets

    parse_targets(cfg.lora_targets)
    if cfg.sft and cfg.data is None:
        raise ValueError("--sft needs --data CHAT.jsonl (records of \"messages\", or "
                         "\"prompt\" and \"completion\")")
    if cfg.lora_rank and cfg.resume:
        raise ValueError("--resume of a LoRA run is not supported; start a new run with "
                         "--init-from OUT (its latest checkpoint holds the merged weights)")


def _parse(path: Path) -> Any:
    """The contents of a .toml or .yaml/.yml options file; a file that does not parse is one
    line naming it and where it breaks (the parsers' own messages name neither)."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        if kind == "TOML":
            import tomllib

            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except OSError:  # a missing or unreadable file: the CLI's own line names it
        raise
    except Exception as err:  # TOMLDecodeError, YAMLError, UnicodeDecodeError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--config {path} is not valid {kind} ({reason}); fix the file, "
                         "or pass the options as flags") from None
