"""retnet: Retentive Networks (Sun et al. 2023), exact in parallel, recurrent and chunkwise form."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Each public name and the module it lives in. They are imported on first use (PEP 562), so
# that `retnet --help` and `retnet --version`, which read only this module, never load torch.
_HOMES = {
    "generate": "retnet.generation",
    "generate_stream": "retnet.generation",
    "load": "retnet.loading",
    "PRESETS": "retnet.model",
    "RetNetConfig": "retnet.model",
    "RetNetLM": "retnet.model",
    "RetNetOutput": "retnet.model",
    "RetNetState": "retnet.model",
    "lm_loss": "retnet.model",
    "load_state": "retnet.model",
    "save_state": "retnet.model",
    "use_inference_layout": "retnet.model",
    "quantize": "retnet.modules.quant",
}

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'retnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
