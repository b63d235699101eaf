"""`retnet.load`, the one loader for inference: a trained model and its tokenizer from a run
directory, a checkpoint folder or a folder written by `retnet export --hf`, on a device, in a
dtype or quantisation and a weight layout; and the values those options take, checked once for
every command (generate, serve, eval, info, bench, the lm-eval wrapper). Lives above the model
layer, which knows nothing of checkpoints or tokenizers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from retnet.checkpoint import check_shapes
from retnet.model import RetNetConfig, RetNetLM, use_inference_layout
from retnet.modules.quant import QUANTIZATIONS, quantize
from retnet.options import short
from retnet.tokenizer import Tokenizer, load_tokenizer

# The dtypes a command may load the weights in (the state stays float32, float64 for float64).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# None: the layout as saved; "inference": the fastest one-token steps on the model's device.
LAYOUTS = (None, "inference")


def check_quantization(quantization: str | None, dtype: str) -> None:
    """One line for a quantization the commands cannot load (generate, serve, eval)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"invalid --quantization {short(quantization)}; use "
                         f"{', '.join(QUANTIZATIONS)}")
    if quantization is not None and dtype != "float32":
        raise ValueError(f"--quantization {quantization} quantises float32 weights: leave "
                         f"--dtype at float32 (got {dtype})")


@dataclass(frozen=True)
class Loaded:
    """What `load_run` read: the model, its tokenizer, its chat template (None: the default)
    and the name of the run or folder it came from."""

    model: RetNetLM
    tokenizer: Tokenizer
    chat_template: dict[str, str] | None
    name: str


def load(path: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, quantization: str | None = None,
         layout: str | None = None, adapter: str | Path | None = None
         ) -> tuple[RetNetLM, Tokenizer]:
    """(model in eval mode, tokenizer) from `path`:

        model, tok = retnet.load("runs/demo")      # a run (its latest checkpoint)
        model, tok = retnet.load("hf/demo")        # a `retnet export --hf` folder

    Checkpoints are verified against their manifest. device: where the weights go (None: the
    CPU). dtype (a torch dtype or a name of `DTYPES`) converts the weights (the state stays
    float32); quantization="int8" then makes them weight-only int8 (`retnet.quantize`);
    layout="inference" lays them out for the fastest one-token steps there
    (`retnet.use_inference_layout`); adapter: a LoRA adapter.safetensors trained on this model
    (`retnet train --lora-save adapter`), merged into the weights first (`retnet.adapter`)."""
    loaded = load_run(path, device, dtype, quantization, layout, adapter)
    return loaded.model, loaded.tokenizer


def load_run(path: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | str | None = None, quantization: str | None = None,
             layout: str | None = None, adapter: str | Path | None = None) -> Loaded:
    """`load`, with the chat template and the name of the run (for `retnet serve`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"invalid layout {short(layout)}; use None or 'inference'")
    path = Path(path)
    if (path / "config.json").is_file() and (path / "generation_config.json").is_file():
        model, tok, template, name = *_load_hf_folder(path), None, path.name
    else:
        from retnet.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        model, tok, template = ckpt.build_model(), ckpt.tokenizer, ckpt.chat_template
        name = ckpt.path.parent.parent.name
    if adapter is not None:
        from retnet.adapter import apply_adapter

        # merged in float32 before any dtype, quantisation or layout, so every fast path (the
        # fused CPU decode included) runs the adapted weights at full speed
        apply_adapter(model, adapter, merge=True)
    model = model.to(device=device, dtype=_dtype(dtype)).eval()
    if quantization is not None:
        quantize(model, quantization)
    if layout == "inference":
        use_inference_layout(model)
    return Loaded(model, tok, template, name)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype given by name: one of `DTYPES`, or any torch dtype (lm-eval's dtype=float16)."""
    if not isinstance(dtype, str):
        return dtype
    found = DTYPES.get(dtype, getattr(torch, dtype, None))
    if not isinstance(found, torch.dtype):
        raise ValueError(f"invalid dtype {short(dtype)}; use {', '.join(DTYPES)}")
    return found


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
