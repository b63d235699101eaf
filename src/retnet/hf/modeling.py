"""A transformers causal LM around the one RetNetLM (no second implementation).

`generate()` keeps the O(1) state in model_kwargs under a key of our own, "retnet_cache",
which transformers' cache machinery (renamed in 5.0, 5.4, 5.6 …) never touches. The state
remembers the token ids it has read; when beam search reorders or duplicates rows, each new
row finds the state row whose history is its own prefix, so reordering is correct without
relying on transformers recognising the cache. That state cannot be rolled back to drop
tokens, so assisted and prompt-lookup decoding are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from retnet.hf.configuration import RetNetHFConfig
from retnet.hf.views import Backbone, TiedHead
from retnet.model import RetNetLM, RetNetState
from retnet.ops import CHUNKWISE, RECURRENT
from retnet.ops.loss import linear_cross_entropy


@dataclass(frozen=True)
class StateCache:
    """The state after reading `consumed` [B, t] (left padding included)."""

    state: RetNetState
    consumed: Tensor

    def select(self, rows: Tensor) -> StateCache:
        return StateCache(self.state.select(rows), self.consumed.index_select(0, rows))


@dataclass
class RetNetCausalLMOutput(ModelOutput):
    """What `forward` returns. A hand-written decode loop passes `retnet_cache` back in
    (`model(next_ids, retnet_cache=out.retnet_cache)`): there is no `past_key_values` and no
    transformers Cache object, since the state is O(1) and not a list of keys and values."""

    loss: Tensor | None = None
    logits: Tensor | None = None  # [B, T, vocab_size]
    retnet_cache: StateCache | None = None
    # n_layers + 1 tensors [B, T, D]: the input of each block, then the final norm's output
    hidden_states: tuple[Tensor, ...] | None = None


# generate()'s output controls that prepare_inputs_for_generation hands on to forward.
OUTPUT_OPTIONS = ("output_hidden_states",)
# Assisted (draft-model), prompt-lookup, early-exit and multi-token-prediction decoding all
# verify draft tokens and then crop the cache back to the accepted ones.
ASSISTED_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit",
                    "use_mtp")


class RetNetForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RetNetHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _is_stateful = True  # transformers' flag for models whose cache cannot be rolled back
    _no_split_modules: ClassVar[list[str]] = ["RetNetBlock"]

    def __init__(self, config: RetNetHFConfig) -> None:
        super().__init__(config)
        self.model = RetNetLM(config.to_retnet())
        # The tied LM head as output embeddings (no parameters of its own); None when untied.
        self.tied_head = TiedHead(self.model) if self.model.lm_head is None else None
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """RetNetLM initialises itself (docs/implementation-notes.md); nothing to add."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # never hand us a transformers Cache: the state lives in retnet_cache

    @property
    def gradient_checkpointing(self) -> bool:
        """The flag `gradient_checkpointing_enable()` / `_disable()` set and
        `is_gradient_checkpointing` reads: the core model's `activation_checkpointing`, which
        checkpoints each block itself (non-reentrant), so the checkpoint function and kwargs
        transformers passes are not used."""
        return self.model.activation_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.model.activation_checkpointing = bool(enable)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    @property
    def base_model(self) -> torch.nn.Module:
        """transformers' body of the model, called with its keyword arguments and read as
        `.last_hidden_state` (TRL's fused LM head): a view of the core model, made on each
        access, that owns nothing."""
        return Backbone(self.model)

    def get_output_embeddings(self) -> torch.nn.Module:
        """The core's untied lm_head, or a view of the embedding when tied."""
        return self.tied_head if self.model.lm_head is None else self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        """transformers' resize_token_embeddings hands back the resized head: an untied head
        is replaced; a tied one is the embedding, already resized, so only itself is accepted."""
        if self.model.lm_head is not None:
            self.model.lm_head = value
        elif value is not self.tied_head:
            raise ValueError("the LM head is tied to the input embedding: resize or replace "
                             "the input embedding instead")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                retnet_cache: StateCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, past_key_values: Any = None,
                **kwargs: Any) -> RetNetCausalLMOutput:
        """input_ids [B, T] (only the new tokens when retnet_cache is given); attention_mask
        [B, T] (left padding); labels [B, T] (shifted here). Returns RetNetCausalLMOutput."""
        if past_key_values is not None:
            raise ValueError("RetNetForCausalLM keeps its state in retnet_cache, not "
                             "past_key_values: pass retnet_cache=out.retnet_cache")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        state = None if retnet_cache is None else retnet_cache.state
        form = RECURRENT if input_ids.shape[1] == 1 else CHUNKWISE  # a step, or a prompt
        hidden = None
        if output_hidden_states or labels is not None:
            out, hidden = self.model.hidden_states(input_ids, state, mode=form,
                                                   attention_mask=attention_mask)
        else:
            out = self.model(input_ids, state=state, mode=form, attention_mask=attention_mask)
        loss = None
        if labels is not None:  # chunked over tokens: no [B·T, vocab] gradient is ever made
            loss = linear_cross_entropy(hidden[-1][:, :-1], self.model.output_weight,
                                        labels[:, 1:])
            hidden = hidden if output_hidden_states else None
        cache = None
        if use_cache is not False:
            seen = input_ids if retnet_cache is None else torch.cat(
                [retnet_cache.consumed, input_ids], 1)
            cache = StateCache(out.state, seen)
        return RetNetCausalLMOutput(loss=loss, logits=out.logits, retnet_cache=cache,
                                    hidden_states=None if hidden is None else tuple(hidden))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """GenerationMixin.generate (greedy, sampling, beam search), refusing assisted decoding
        in one line that says why, before transformers' own checks."""
        config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)
        _refuse_assisted(config or self.generation_config, kwargs)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: Tensor,
                                      retnet_cache: StateCache | None = None,
                                      attention_mask: Tensor | None = None,
                                      use_cache: bool | None = True, **kwargs: Any
                                      ) -> dict[str, Any]:
        """After the prefill, only the tokens the state has not read (one per step)."""
        # transformers 5 passes output_hidden_states through here, 4.x adds it afterwards
        extra = {"use_cache": use_cache, **{k: kwargs[k] for k in OUTPUT_OPTIONS if k in kwargs}}
        cache = None
        if retnet_cache is not None and use_cache is not False:
            # None when no state row fits (rows edited by hand): read everything again
            cache = _match_rows(retnet_cache, input_ids)
        if cache is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        t = cache.consumed.shape[1]
        mask = None if attention_mask is None else attention_mask[:, t:]
        return {"input_ids": input_ids[:, t:], "attention_mask": mask, "retnet_cache": cache,
                **extra}

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


def _refuse_assisted(config: GenerationConfig, kwargs: dict[str, Any]) -> None:
    for name in ASSISTED_OPTIONS:
        if kwargs.get(name, getattr(config, name, None)) not in (None, False):
            raise ValueError(
                f"{name}: assisted and prompt-lookup decoding are not supported by RetNet: "
                "they roll the cache back past rejected draft tokens, and a RetNet state "
                "cannot be rolled back (it holds a sum over the whole history, not per-token "
                "keys and values); use greedy, sampling or beam search")
