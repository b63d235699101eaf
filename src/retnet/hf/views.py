"""Thin transformers-facing views of the core RetNetLM, for libraries that look inside a causal LM.

TRL's SFTTrainer (1.16) patches in a fused LM head that calls `model.base_model(input_ids,
attention_mask, use_cache=False)`, reads `.last_hidden_state` and projects it through
`model.get_output_embeddings()`'s `.weight` and `.bias`. The core model speaks neither
transformers' keyword arguments nor its output types, and stays that way: these views translate,
own no parameters and hold no state, so the core stays the one implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from retnet.model import RetNetLM
from retnet.ops import CHUNKWISE, RECURRENT

# transformers' switches that do not change the residual stream: accepted and ignored.
IGNORED_OPTIONS = frozenset({"use_cache", "return_dict", "output_attentions",
                             "output_hidden_states"})


class Backbone(nn.Module):
    """The body of the causal LM, as transformers' `base_model`: the core's final hidden states
    (the final norm's output, what the LM head reads) as BaseModelOutput.last_hidden_state."""

    def __init__(self, core: RetNetLM) -> None:
        super().__init__()
        self.model = core

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **kwargs: Any) -> BaseModelOutput:
        """input_ids [B, T]; attention_mask [B, T] (padding). Returns last_hidden_state
        [B, T, D]. Options that would change the result without the core knowing (packed rows'
        position_ids, cu_seq_lens, ...) are refused rather than silently ignored."""
        unknown = sorted(k for k, v in kwargs.items()
                         if k not in IGNORED_OPTIONS and v is not None)
        if unknown:
            raise ValueError(f"RetNet's backbone does not take {', '.join(unknown)}: packed "
                             "rows (padding_free / position_ids) are not read through "
                             "transformers; pass one sequence per row with an attention_mask")
        form = RECURRENT if input_ids.shape[1] == 1 else CHUNKWISE  # as the wrapper's forward
        _, hidden = self.model.hidden_states(input_ids, mode=form, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden[-1])


class TiedHead(nn.Module):
    """The LM head of a tied model, as transformers' output embeddings: `weight` is the input
    embedding's matrix [vocab_size, D] (read on each access, so it follows a resized or replaced
    embedding), `bias` None. It holds the core without registering it, so it adds no parameters
    and no state-dict keys; the wrapper registers it so `named_modules()` finds it."""

    bias = None

    def __init__(self, core: RetNetLM) -> None:
        super().__init__()
        self.__dict__["core"] = core  # not a submodule: the wrapper owns the core

    @property
    def weight(self) -> Tensor:
        return self.core.output_weight

    def __setattr__(self, name: str, value) -> None:
        """transformers before 5 ties by assigning the input embedding's weight to the head
        (`_tie_or_clone_weights`): that is already this head's weight, so accept exactly it."""
        if name == "weight":
            if value is not self.core.output_weight:
                raise ValueError("a tied head's weight is the input embedding's; untie the "
                                 "model (tie_embeddings=False) to give the head its own")
            return
        super().__setattr__(name, value)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @out_features.setter
    def out_features(self, value: int) -> None:
        """transformers' resize sets this on a head whose weight is already resized (tied)."""
        if value != self.out_features:
            raise ValueError(f"a tied head has the embedding's {self.out_features} rows, "
                             f"not {value}")

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.nn.functional.linear(hidden, self.weight)
