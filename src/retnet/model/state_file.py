"""State files: a RetNetState saved as safetensors with its model config's fingerprint
(`retnet generate --state-out` / `--state-in`). Apart from model/state.py because that module
travels in an exported folder's remote code, and file writing does not."""

from __future__ import annotations

from pathlib import Path

import torch

from retnet.files import atomic_write
from retnet.model.state import RetNetState

STATE_FORMAT = "retnet-state-v1"


def save_state(path: str | Path, state: RetNetState, fingerprint: str) -> None:
    """Write a state as safetensors with the model config's fingerprint (atomic: temp + rename;
    a failed write is one `retnet.files.WriteError` line and leaves an earlier file as it was)."""
    from safetensors.torch import save_file

    tensors = {f"kv.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state.kv)}
    tensors["offset"] = state.offset.detach().to("cpu").contiguous()
    metadata = {"format": STATE_FORMAT, "config": fingerprint, "layers": str(len(state.kv))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(path: str | Path, fingerprint: str, device: torch.device | str = "cpu"
               ) -> RetNetState:
    """Read a state saved by `save_state`; refuses a state made by a model of another config."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a retnet state file (format "
                                 f"{meta.get('format')!r}, expected {STATE_FORMAT!r})")
            if meta.get("config") != fingerprint:
                raise ValueError(f"{path} was saved by a model with another config "
                                 f"(fingerprint {meta.get('config')}, this model {fingerprint}); "
                                 "use the model that made it")
            kv = tuple(f.get_tensor(f"kv.{i}") for i in range(int(meta["layers"])))
            return RetNetState(kv, f.get_tensor("offset"))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:
        raise ValueError(f"cannot read state file {path}: {err}") from None
