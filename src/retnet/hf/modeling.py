"""A transformers causal LM around the one RetNetLM (no second implementation).

`generate()` keeps the O(1) state in model_kwargs under a key of our own, "retnet_cache",
which transformers' cache machinery (renamed in 5.0, 5.4, 5.6 …) never touches. The state
remembers the token ids it has read; when beam search reorders or duplicates rows, each new
row finds the state row whose history is its own prefix, so reordering is correct without
relying on transformers recognising the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from retnet.model import RetNetConfig, RetNetLM, RetNetState, lm_loss

MODEL_TYPE = "retnet_exact"  # not "retnet": flash-linear-attention registers that name


class RetNetHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        # Every RetNetConfig field, with RetNetConfig's defaults.
        import dataclasses

        for f in dataclasses.fields(RetNetConfig):
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        # The core model ties internally (one tensor); transformers has nothing to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def to_retnet(self) -> RetNetConfig:
        import dataclasses

        return RetNetConfig(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(RetNetConfig)})

    @classmethod
    def from_retnet(cls, config: RetNetConfig, **kwargs: Any) -> RetNetHFConfig:
        return cls(**config.to_dict(), **kwargs)


@dataclass(frozen=True)
class StateCache:
    """The state after reading `consumed` [B, t] (left padding included)."""

    state: RetNetState
    consumed: Tensor

    def select(self, rows: Tensor) -> StateCache:
        return StateCache(self.state.select(rows), self.consumed.index_select(0, rows))


@dataclass
class RetNetCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    retnet_cache: StateCache | None = None


class RetNetForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RetNetHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["RetNetBlock"]

    def __init__(self, config: RetNetHFConfig) -> None:
        super().__init__(config)
        self.model = RetNetLM(config.to_retnet())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """RetNetLM initialises itself (docs/implementation-notes.md); nothing to add."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # never hand us a transformers Cache: the state lives in retnet_cache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> None:
        return None  # tied inside the core model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                retnet_cache: StateCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> RetNetCausalLMOutput:
        """input_ids [B, T] (only the new tokens when retnet_cache is given)."""
        state = None if retnet_cache is None else retnet_cache.state
        mode = "recurrent" if input_ids.shape[1] == 1 else "chunkwise"
        out = self.model(input_ids, state=state, mode=mode, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = lm_loss(out.logits[:, :-1], labels[:, 1:])
        cache = None
        if use_cache is not False:
            seen = input_ids if retnet_cache is None else torch.cat(
                [retnet_cache.consumed, input_ids], 1)
            cache = StateCache(out.state, seen)
        return RetNetCausalLMOutput(loss=loss, logits=out.logits, retnet_cache=cache)

    def prepare_inputs_for_generation(self, input_ids: Tensor,
                                      retnet_cache: StateCache | None = None,
                                      attention_mask: Tensor | None = None,
                                      use_cache: bool | None = True, **kwargs: Any
                                      ) -> dict[str, Any]:
        """After the prefill, only the tokens the state has not read (one per step)."""
        if retnet_cache is None or use_cache is False:
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "use_cache": use_cache}
        cache = _match_rows(retnet_cache, input_ids)
        if cache is None:  # no state row fits (rows edited by hand): read everything again
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "use_cache": use_cache}
        t = cache.consumed.shape[1]
        mask = None if attention_mask is None else attention_mask[:, t:]
        return {"input_ids": input_ids[:, t:], "attention_mask": mask, "retnet_cache": cache,
                "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput,
                                            model_kwargs: dict[str, Any], *args: Any,
                                            **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                   *args, **kwargs)
        model_kwargs["retnet_cache"] = outputs.get("retnet_cache")
        return model_kwargs


def _match_rows(cache: StateCache, input_ids: Tensor) -> StateCache | None:
    """The state rows whose history is each row's prefix (beam search reorders rows)."""
    consumed = cache.consumed
    t = consumed.shape[1]
    if input_ids.shape[1] <= t:
        return None
    prefix = input_ids[:, :t]
    if prefix.shape == consumed.shape and torch.equal(prefix, consumed):
        return cache
    match = (prefix[:, None, :] == consumed[None, :, :]).all(-1)  # [B_new, B_old]
    if not bool(match.any(-1).all()):
        return None
    return cache.select(match.to(torch.int8).argmax(-1))
