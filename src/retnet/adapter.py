"""LoRA adapter files: the A and B matrices of `retnet.modules.lora` in one safetensors file,
with the rank, alpha, targets and the fingerprint of the base model they were trained on, so
that `retnet generate/serve --adapter FILE` apply them only to that base.

    adapter.safetensors   blocks.0.retention.q_proj.lora_A [r, in], ....lora_B [out, r], ...
                          metadata: format, rank, alpha, targets (JSON), base_fingerprint
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from retnet.files import atomic_write
from retnet.model import RetNetLM
from retnet.modules.lora import ADAPTER_FORMAT, adapter_info, add_lora, lora_layers, merge_lora

ADAPTER_FILE = "adapter.safetensors"


def save_adapter(model: RetNetLM, path: str | Path) -> Path:
    """Write `model`'s adapters (unmerged) to `path`; returns it."""
    info = adapter_info(model)
    tensors = {f"{name}.{part}": getattr(layer, part).detach().cpu().contiguous()
               for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    metadata = {"format": ADAPTER_FORMAT, "rank": str(info["rank"]),
                "alpha": repr(float(info["alpha"])), "targets": json.dumps(info["targets"]),
                "base_fingerprint": model.config.fingerprint()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; one line for a file that is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # FileNotFoundError, SafetensorError: the same user problem
        raise ValueError(f"--adapter {path} is not a readable adapter file ({err}); pass the "
                         f"{ADAPTER_FILE} written by `retnet train --lora-save adapter`") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"--adapter {path} is not a retnet LoRA adapter (format "
                         f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT})")
    return tensors, metadata


def apply_adapter(model: RetNetLM, path: str | Path, merge: bool = True) -> RetNetLM:
    """Load the adapter at `path` into `model` (its base) and, by default, merge it into the
    weights, so every fast path runs at full speed; returns `model`."""
    tensors, meta = read_adapter(path)
    if meta.get("base_fingerprint") != model.config.fingerprint():
        raise ValueError(f"--adapter {path} was trained on another base model (fingerprint "
                         f"{meta.get('base_fingerprint')}, this one {model.config.fingerprint()}"
                         "); pass the checkpoint it was trained from")
    add_lora(model, int(meta["rank"]), float(meta["alpha"]), tuple(json.loads(meta["targets"])))
    expected = {f"{n}.{p}" for n in lora_layers(model) for p in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        raise ValueError(f"--adapter {path} does not match its own targets (e.g. "
                         f"{sorted(set(tensors) ^ expected)[:2]}); the file is damaged")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
    for p in model.parameters():  # add_lora froze them for training; inference needs none
        p.requires_grad_(False)
    return merge_lora(model) if merge else model
