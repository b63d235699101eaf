"""Native LoRA (Hu et al. 2021, arXiv:2106.09685) on RetNet's projections, without PEFT:

    y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ     W [out, in] frozen; A [r, in], B [out, r] trained

`add_lora` wraps the targeted projections (`TARGETS`) in place and freezes every other
weight; `merged_state_dict` gives the weights W + (α/r)·B·A of a plain model (what a
checkpoint saves by default), `merge_lora` writes them back and removes the adapters, and
`save_adapter` / `apply_adapter` keep A and B in a file of their own. In training, the fused
norm+projections and activation+down paths take the update inside (`LowRank`: they recompute
LoRA's input in the backward, as they recompute the norm's and the activation's output); at
inference, `retnet.kernels.dispatch` sends a model holding an unmerged adapter (`has_adapters`)
away from the fused decode step, and `retnet.modules.layout` never reads its projections as one
fused weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from retnet.kernels.decode import forget_plan
from retnet.kernels.dispatch import ADAPTERS
from retnet.modules.linear import Linear
from retnet.ops.linear import linear
from retnet.ops.low_rank import LowRank, add_low_rank

# --lora-targets names → the projections they wrap, relative to each block.
TARGETS: dict[str, tuple[str, ...]] = {
    "q": ("retention.q_proj",), "k": ("retention.k_proj",), "v": ("retention.v_proj",),
    "g": ("retention.g_proj",), "o": ("retention.out_proj",),
    "ffn": ("ffn.up", "ffn.gate", "ffn.down"),
}
ADAPTER_FORMAT = "retnet-lora-v1"


class LoRALinear(Linear):
    """A projection with a low-rank update: the base weight (the same Parameter, frozen) plus
    (alpha/rank)·B·A. B starts at zero, so the wrapped model computes what it did before."""

    def __init__(self, base: Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)  # Linear's own __init__ would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.rank, self.alpha = rank, alpha
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype,
                                               device=w.device))
        # PEFT's initialisation of A, so that both start from the same distribution
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] → [..., out]."""
        return add_low_rank(linear(x, self.weight), x, self.low_rank())

    def low_rank(self) -> LowRank:
        """The update beside the weight, for the fused training paths that take one."""
        return LowRank(self.lora_A, self.lora_B, self.scale)

    def projection(self) -> tuple[Tensor, LowRank | None]:
        return self.weight, self.low_rank()

    def delta(self) -> Tensor:
        """(alpha/rank)·B·A [out, in] in the base weight's dtype (computed in at least float32,
        so that a bf16 base gets one rounding)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype) * self.scale).to(self.weight.dtype)


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"q,k,v" (or a list) → ("q", "k", "v"), each checked against `TARGETS`."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets: unknown target {', '.join(unknown) or '(none)'}; "
                         f"use a comma-separated subset of {','.join(TARGETS)}")
    return tuple(dict.fromkeys(names))


def _targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, Linear]]:
    """(name, projection) of every projection `targets` name, in module order."""
    suffixes = tuple(f".{p}" for t in targets for p in TARGETS[t])
    found = [(n, m) for n, m in model.named_modules()
             if n.endswith(suffixes) and isinstance(m, Linear)]
    if not found:
        raise ValueError(f"--lora-targets {','.join(targets)}: this model has none of those "
                         "projections (g needs use_gate, the FFN gate a GLU)")
    return found


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]
             ) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted projections in `LoRALinear`,
    in place; returns the wrapped module names. Seeded by the caller's torch RNG."""
    if rank < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA needs rank ≥ 1 and a positive alpha; got rank {rank}, "
                         f"alpha {alpha}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, module in _targeted(model, targets):
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already holds a LoRA adapter; merge it first")
        _set(model, name, LoRALinear(module, rank, alpha))
        names.append(name)
    _flag(model, True)
    forget_plan(model)  # the fused decode step's cached arguments name the old modules
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain model `model` would be once merged: each wrapped weight
    W + (α/r)·B·A, no lora_A / lora_B keys. `model` is unchanged."""
    layers = lora_layers(model)
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith((".lora_A", ".lora_B"))}
    with torch.no_grad():
        for name, layer in layers.items():
            state[f"{name}.weight"] = layer.weight + layer.delta()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add each adapter into its base weight (in place: the Parameter and its storage stay,
    so a fused decode layout stays valid) and put back plain projections; returns `model`."""
    for name, layer in lora_layers(model).items():
        layer.weight.add_(layer.delta())
        plain = Linear.__new__(Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = layer.in_features, layer.out_features
        plain.weight = layer.weight
        plain.register_parameter("bias", None)
        _set(model, name, plain)
    _flag(model, False)
    forget_plan(model)
    return model


def _flag(model: nn.Module, unmerged: bool) -> None:
    """Tell the dispatch table (`ADAPTERS`) of every language model in `model` whether it
    holds unmerged adapters: the fused decode step does not read them."""
    for m in model.modules():
        if "blocks" in m._modules:
            if unmerged:
                m.__dict__[ADAPTERS] = True
            else:
                m.__dict__.pop(ADAPTERS, None)


def adapter_info(model: nn.Module) -> dict[str, Any]:
    """rank, alpha and targets of `model`'s adapters (one rank and alpha for all)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model holds no LoRA adapter")
    first = next(iter(layers.values()))
    targets = [t for t, paths in TARGETS.items()
               if any(n.endswith(tuple(f".{p}" for p in paths)) for n in layers)]
    return {"rank": first.rank, "alpha": first.alpha, "targets": targets}
