"""The architectures of a study, each built at a size's width and depth with its non-embedding
parameters matched to that size's RetNet: our RetNet (and its Table 6 variants) and plain
linear attention as options of the one model; Llama, Mamba, Mamba-2 and RWKV from transformers
(their PyTorch paths). Every model is wrapped to take ids [B, T] and give the mean loss through
the same chunked cross-entropy, so cells differ in their architecture only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from retnet.compare.baselines import llama_non_embedding, matched_llama_config
from retnet.compare.config import VARIANTS
from retnet.model import RetNetConfig, RetNetLM
from retnet.ops import CHUNKWISE
from retnet.ops.loss import linear_cross_entropy
from retnet.study.grid import BASE, Cell

# Plain linear attention (the paper's "Linear Transformer" row) as our model's options.
LINEAR = {"decays": "none", "use_gate": False, "rotation": False}


class RetNetLoss(torch.nn.Module):
    """A RetNetLM read in the chunkwise form (linear cost, equal to the parallel form)."""

    def __init__(self, model: RetNetLM) -> None:
        super().__init__()
        self.model = model

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mode=CHUNKWISE, targets=targets).loss

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mode=CHUNKWISE).logits  # [B, T, V]

    def non_embedding(self) -> int:
        return self.model.num_parameters(embeddings=False)


class HFLoss(torch.nn.Module):
    """A transformers *ForCausalLM: its backbone's last hidden states [B, T, D] against its
    output embedding, as `compare.baselines.llama_loss` does for the Llama. Windows are read
    as one sequence by every architecture (Mamba's and RWKV's PyTorch paths cannot restart
    their state at a document boundary)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden, self.model.get_output_embeddings().weight, targets)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits  # [B, T, V]

    def non_embedding(self) -> int:
        return llama_non_embedding(self.model)


def base_config(cell: Cell, vocab: int) -> RetNetConfig:
    s = cell.size
    return RetNetConfig(vocab_size=vocab, d_model=s.d_model, n_layers=s.n_layers,
                        n_heads=s.n_heads)


def variant_overrides(variant: str, base: RetNetConfig) -> dict[str, Any]:
    """compare's Table 6 overrides; "small-heads" as a key head dim of 32 at every width
    (compare's 6 heads at d_model 192)."""
    if variant == BASE:
        return {}
    if variant == "small-heads":
        return {"n_heads": max(1, base.d_model // 32)}
    return dict(VARIANTS[variant])


def _count(build: Callable[[], torch.nn.Module]) -> int:
    """Non-embedding parameters of a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return _wrap(build()).non_embedding()


def _wrap(model) -> torch.nn.Module:
    return RetNetLoss(model) if isinstance(model, RetNetLM) else HFLoss(model)


def _solve(count: Callable[[int], int], start: int, target: int) -> int:
    """The integer knob k ≥ 1 whose count(k), linear in k, is nearest `target`."""
    c0, slope = count(start), count(start + 1) - count(start)
    return max(1, round(start + (target - c0) / slope)) if slope else start


def _retnet(cell: Cell, vocab: int, target: int, extra: dict[str, Any]) -> Callable:
    """A RetNet with `extra` options, its FFN width solved to match `target` when they
    change the parameter count (no gate, linear attention, smaller heads)."""
    base = base_config(cell, vocab)
    values = {**base.to_dict(), **extra}
    if not extra:
        return lambda: RetNetLM(base)

    def with_ffn(ffn: int) -> RetNetLM:
        return RetNetLM(RetNetConfig.from_dict({**values, "ffn_dim": ffn}))

    ffn = _solve(lambda f: _count(lambda: with_ffn(f)), base.ffn_dim, target)
    return lambda: with_ffn(ffn)


def _llama(cell: Cell, vocab: int, target: int) -> Callable:
    from transformers import LlamaForCausalLM

    base = base_config(cell, vocab)
    # head dim 64 (compare's) where the width allows it; 32 below
    head_dim = 64 if base.d_model % 64 == 0 else 32
    config = matched_llama_config(base, head_dim=head_dim, max_position_embeddings=4096)
    return lambda: LlamaForCausalLM(config)


def _mamba(cell: Cell, vocab: int, target: int) -> Callable:
    """Two Mamba layers per RetNet layer (a block is mixer only, no FFN; the Mamba paper's
    pairing), the inner width solved to match."""
    from transformers import MambaConfig, MambaForCausalLM

    def build(inner: int):
        config = MambaConfig(vocab_size=vocab, hidden_size=cell.size.d_model,
                             num_hidden_layers=2 * cell.size.n_layers, tie_word_embeddings=True,
                             use_mambapy=False)
        config.intermediate_size = inner  # the config derives it from an integer expand
        return MambaForCausalLM(config)

    inner = _solve(lambda i: _count(lambda: build(i)), 2 * cell.size.d_model, target)
    return lambda: build(inner)


def _mamba2(cell: Cell, vocab: int, target: int) -> Callable:
    """Mamba-2 at expand 2, head dim 16 (a divisor of every width used here): the layer count
    and state size nearest the target (its inner width is an integer multiple of d)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    d, L = cell.size.d_model, cell.size.n_layers

    def build(layers: int, state: int):
        return Mamba2ForCausalLM(Mamba2Config(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, expand=2, head_dim=16,
            num_heads=2 * d // 16, n_groups=1, state_size=state, chunk_size=64,
            tie_word_embeddings=True))

    options = [(layers, state) for layers in range(L, 3 * L + 1) for state in range(8, 129, 8)]
    best = min(options, key=lambda o: abs(_count(lambda: build(*o)) - target))
    return lambda: build(*best)


def _rwkv(cell: Cell, vocab: int, target: int) -> Callable:
    from transformers import RwkvConfig, RwkvForCausalLM

    def build(inner: int):
        return RwkvForCausalLM(RwkvConfig(
            vocab_size=vocab, hidden_size=cell.size.d_model, num_hidden_layers=cell.size.n_layers,
            attention_hidden_size=cell.size.d_model, intermediate_size=inner,
            context_length=4096, tie_word_embeddings=True))

    inner = _solve(lambda i: _count(lambda: build(i)), 4 * cell.size.d_model, target)
    return lambda: build(inner)


def builder(cell: Cell, vocab: int) -> Callable[[], torch.nn.Module]:
    """A function that builds the cell's model, wrapped (`RetNetLoss` / `HFLoss`), with its
    non-embedding parameters matched to the size's RetNet. Raises ImportError where the
    architecture's library is missing, ValueError where the size does not fit it."""
    base = base_config(cell, vocab)
    target = _count(lambda: RetNetLM(base))
    if cell.arch == "retnet":
        make = _retnet(cell, vocab, target, variant_overrides(cell.variant, base))
    elif cell.arch == "linear":
        make = _retnet(cell, vocab, target, LINEAR)
    else:
        make = {"llama": _llama, "mamba": _mamba, "mamba2": _mamba2,
                "rwkv": _rwkv}[cell.arch](cell, vocab, target)
    return lambda: _wrap(make())


def target_parameters(cell: Cell, vocab: int) -> int:
    return _count(lambda: RetNetLM(base_config(cell, vocab)))


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """The built model's config, for the cell's record."""
    inner = model.model
    if isinstance(inner, RetNetLM):
        return {"class": "RetNetLM", **inner.config.to_dict()}
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "head_dim", "state_size", "num_heads", "expand",
            "attention_hidden_size")
    config = inner.config
    return {"class": type(inner).__name__,
            **{k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}}
