"""A Transformer matched to a RetNet: transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU,
sdpa attention) with the same d_model, layers, vocabulary and tied embeddings, head dim 64,
and the SwiGLU width that makes its non-embedding parameter count equal RetNet's (the
baseline for the cost benchmarks and the language-modelling comparison)."""

from __future__ import annotations

from typing import Any

import torch

from retnet.model import RetNetConfig, RetNetLM
from retnet.ops.documents import block_causal_mask, document_positions
from retnet.ops.loss import linear_cross_entropy

LLAMA_HEAD_DIM = 64


def retnet_non_embedding(config: RetNetConfig) -> int:
    with torch.device("meta"):
        return RetNetLM(config).num_parameters(embeddings=False)


def matched_llama_config(config: RetNetConfig, head_dim: int = LLAMA_HEAD_DIM, **overrides: Any):
    """A LlamaConfig whose non-embedding parameters equal RetNet's (to within one SwiGLU row)."""
    from transformers import LlamaConfig

    d, L = config.d_model, config.n_layers
    if d % head_dim:
        raise ValueError(f"d_model {d} is not a multiple of the Llama head dim {head_dim}")
    target = retnet_non_embedding(config)
    # per layer: attention 4·d², SwiGLU 3·d·I, two RMSNorms 2·d; plus the final norm d
    per_layer = (target - d) / L
    intermediate = round((per_layer - 4 * d * d - 2 * d) / (3 * d))
    values = dict(vocab_size=config.vocab_size, hidden_size=d, num_hidden_layers=L,
                  num_attention_heads=d // head_dim, num_key_value_heads=d // head_dim,
                  head_dim=head_dim, intermediate_size=intermediate,
                  tie_word_embeddings=config.tie_embeddings, rms_norm_eps=1e-5,
                  max_position_embeddings=65536, attention_dropout=0.0,
                  attn_implementation="sdpa")
    values.update(overrides)
    return LlamaConfig(**values)


def matched_llama(config: RetNetConfig, **overrides: Any):
    """A randomly initialised LlamaForCausalLM matched to `config` (sdpa attention)."""
    from transformers import LlamaForCausalLM

    llama_config = matched_llama_config(config, **overrides)
    model = LlamaForCausalLM(llama_config)
    model.config._attn_implementation = "sdpa"
    return model


def document_inputs(resets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The arguments that make a Llama read a packed row [B, T] as its documents alone, as
    RetNet does with `resets`: a block-diagonal causal mask [B, 1, T, T] (passed to sdpa as
    is, so no causal fast path) and position ids restarting at 0 per document. {} without
    resets (the plain causal path)."""
    if resets is None:
        return {}
    B, T = resets.shape
    seen = torch.arange(1, T + 1, device=resets.device).expand(B, T)  # [B, T] tokens so far
    every = torch.ones_like(resets)
    positions, _ = document_positions(seen.new_zeros(B), seen, every, resets)
    return {"attention_mask": block_causal_mask(resets), "position_ids": positions}


def llama_loss(model, ids: torch.Tensor, targets: torch.Tensor,
               resets: torch.Tensor | None = None) -> torch.Tensor:
    """A LlamaForCausalLM's mean next-token loss on ids [B, T] against targets [B, T]
    through RetNet's chunked cross-entropy (`retnet.ops.loss`) on its final hidden states,
    so that a comparison of the two measures their architectures, not their losses. resets
    [B, T]: documents packed in a row, each attending to itself only (`document_inputs`)."""
    hidden = model.model(input_ids=ids, use_cache=False,
                         **document_inputs(resets)).last_hidden_state  # [B, T, D]
    return linear_cross_entropy(hidden, model.lm_head.weight, targets)


def llama_non_embedding(model) -> int:
    embed = model.get_input_embeddings().weight
    skip = {id(embed)}
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
