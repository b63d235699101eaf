"""RetNetHFConfig: a RetNetConfig as a transformers PretrainedConfig (every field, same defaults).

Kept apart from the model wrapper because exported folders ship it as their own
configuration_retnet.py (see `retnet.hf.bundle`), as transformers' remote code expects.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from retnet.model import RetNetConfig

MODEL_TYPE = "retnet_exact"  # not "retnet": flash-linear-attention registers that name


class RetNetHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        for f in dataclasses.fields(RetNetConfig):
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        # Derived, never set on its own: the core model ties inside itself (one tensor, so
        # transformers has nothing to tie), but readers of config.json (accelerate, vLLM, the
        # Hub) learn from this key whether the LM head is the embedding.
        kwargs["tie_word_embeddings"] = bool(self.tie_embeddings)
        super().__init__(**kwargs)

    def to_retnet(self) -> RetNetConfig:
        return RetNetConfig(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(RetNetConfig)})

    @classmethod
    def from_retnet(cls, config: RetNetConfig, **kwargs: Any) -> RetNetHFConfig:
        return cls(**config.to_dict(), **kwargs)
