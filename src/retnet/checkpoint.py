"""Checkpoints that survive crashes: a complete directory is written under a temporary name,
renamed into place, and only then named by the `latest` pointer (each step atomic).

    RUN/checkpoints/step-000100/  model.safetensors  config.json  tokenizer.json
                                  train_state.pt (optimiser, step, RNG; tensors only)  meta.json
    RUN/latest                    "step-000100"

Nothing is ever unpickled: weights are safetensors, the rest loads with weights_only=True.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from retnet.model import RetNetConfig, RetNetLM
from retnet.tokenizer import Tokenizer, load_tokenizer, save_chat_template

KEEP = 2  # complete checkpoints kept per run


@dataclass
class Checkpoint:
    path: Path
    config: RetNetConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    meta: dict[str, Any]

    def build_model(self, device: torch.device | str | None = None) -> RetNetLM:
        model = RetNetLM(self.config)
        model.load_state_dict(self.weights)
        return model.to(device).eval()

    def train_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / "train_state.pt", weights_only=True, map_location="cpu")
        except Exception as err:  # any unreadable file is the same user problem
            raise ValueError(_corrupt(self.path, err)) from None


def _corrupt(path: Path, err: Exception) -> str:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"checkpoint {path} is corrupt or truncated ({reason}); use an earlier one under "
            f"{path.parent} or start a new run")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    config: RetNetConfig, tokenizer: Tokenizer, train_state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write RUN/checkpoints/step-N atomically, then point RUN/latest at it."""
    run_dir = Path(run_dir)
    name = f"step-{step:06d}"
    final = run_dir / "checkpoints" / name
    tmp = final.with_name(f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "retnet-v1"})
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    tokenizer.save(tmp / "tokenizer.json")
    save_chat_template(tmp)
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step,
                                               "config_fingerprint": config.fingerprint()},
                                              indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    pointer = run_dir / "latest"
    pointer.with_suffix(".tmp").write_text(name)
    os.replace(pointer.with_suffix(".tmp"), pointer)
    _prune(final.parent, keep=KEEP)
    return final


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.iterdir() if p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows `latest`) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    pointer = path / "latest"
    if pointer.is_file():
        target = path / "checkpoints" / pointer.read_text().strip()
        if target.is_dir():
            return target
        raise ValueError(f"{pointer} names {target.name}, which is missing; "
                         f"pick a checkpoint under {path / 'checkpoints'}")
    raise FileNotFoundError(f"no checkpoint at {path}: expected a run directory with a "
                            "'latest' file or a folder holding model.safetensors")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (weights, config, tokenizer, meta); the training state stays on disk."""
    path = resolve_checkpoint(path)
    try:
        config = RetNetConfig.from_dict(json.loads((path / "config.json").read_text()))
        meta = json.loads((path / "meta.json").read_text())
        weights = load_file(path / "model.safetensors")
        tokenizer = load_tokenizer(path / "tokenizer.json")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(_corrupt(path, err)) from None
    except Exception as err:  # safetensors raises its own error type on truncation
        raise ValueError(_corrupt(path, err)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model only {config.vocab_size}; they do not belong together")
    with torch.device("meta"):
        expected = set(RetNetLM(config).state_dict())
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        raise ValueError(f"checkpoint {path} does not match its config.json "
                         f"(missing e.g. {missing}); it is damaged or was edited")
    return Checkpoint(path, config, weights, tokenizer, meta)
