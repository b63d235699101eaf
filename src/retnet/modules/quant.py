"""Weight-only int8 for inference: each weight row stored as int8 with one float32 scale per
output channel (row), activations and the state left in float32.

`quantize(model, "int8")` replaces, in place, every projection (`retnet.modules.linear.Linear`)
by an `Int8Linear` and the embedding table by an `Int8Embedding`; with tied embeddings that one
int8 table is both the input embedding (a row dequantised per token) and the LM head (its rows
are the output channels, so the head's scales are the table's row scales). Norm weights stay
float32. The float weights are dropped: a quantised model is for decoding and evaluation, not
for training or saving. The forwards here are the reference (dequantise, then the float
product); the fused CPU decode kernel reads the int8 rows directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retnet.kernels.decode import forget_plan
from retnet.modules.linear import Linear

QUANTIZATIONS = ("int8",)


@torch.no_grad()
def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] → (int8 [N, K], float32 scales [N]) with weight ≈ q · scale[:, None]:
    symmetric, scale = max |row| / 127 (rounded to nearest)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]; an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ, with the int8 rows in `weight` [out, in] and `scales` [out]."""

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int8Embedding(nn.Module):
    """Rows of `weight` [vocab, D] int8 times their `scales` [vocab]."""

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float() * self.scales[ids].unsqueeze(-1)


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Store `model`'s projections and embedding table (hence a tied LM head) as weight-only
    int8, in place; returns the model. Float32 models only (quantise before any .to(bf16))."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; use one of {', '.join(QUANTIZATIONS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Linear, nn.Embedding)):
                kind = Int8Linear if isinstance(child, Linear) else Int8Embedding
                setattr(parent, name, kind(*quantize_rows(child.weight)))
    forget_plan(model)  # the fused decode step's cached arguments point at the float weights
    return model


def weight_scales(module: nn.Module) -> Tensor | None:
    """The per-row scales of a quantised layer, None for a float one."""
    return getattr(module, "scales", None)
