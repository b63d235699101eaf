"""`retnet.load`: a trained model and its tokenizer from a run directory, a checkpoint folder
or a folder written by `retnet export --hf`, in one line. Lives above the model layer, which
knows nothing of checkpoints or tokenizers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from retnet.checkpoint import check_shapes
from retnet.model import RetNetConfig, RetNetLM
from retnet.modules.quant import quantize
from retnet.tokenizer import Tokenizer, load_tokenizer


def load(path: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None,
         quantization: str | None = None) -> tuple[RetNetLM, Tokenizer]:
    """(model in eval mode, tokenizer) from `path`:

        model, tok = retnet.load("runs/demo")      # a run (its latest checkpoint)
        model, tok = retnet.load("hf/demo")        # a `retnet export --hf` folder

    Checkpoints are verified against their manifest; dtype converts the weights (the state
    stays float32); quantization="int8" then makes them weight-only int8 (`retnet.quantize`)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "generation_config.json").is_file():
        model, tok = _load_hf_folder(path)
    else:
        from retnet.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        model, tok = build_model(ckpt), ckpt.tokenizer
    model = model.to(device=device, dtype=dtype).eval()
    if quantization is not None:
        quantize(model, quantization)
    return model, tok


def _load_hf_folder(path: Path) -> tuple[RetNetLM, Tokenizer]:
    """An exported folder without transformers: its config.json holds every RetNetConfig
    field, its weights are the core model's under the wrapper's `model.` prefix."""
    from safetensors.torch import load_file

    values = json.loads((path / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(RetNetConfig)}
    try:
        config = RetNetConfig.from_dict({k: v for k, v in values.items() if k in fields})
        weights = load_file(path / "model.safetensors")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable `retnet export --hf` folder: {err}") from None
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    check_shapes(path, config, weights, names=False)
    model = RetNetLM(config)
    model.load_state_dict(weights)
    return model, load_tokenizer(path / "tokenizer.json")


def build_model(ckpt, device: torch.device | str | None = None) -> RetNetLM:
    """A `Checkpoint`'s model in eval mode on `device` (load_checkpoint checked its shapes)."""
    return ckpt.build_model(device)
