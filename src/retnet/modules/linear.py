"""nn.Linear without bias whose product goes through `retnet.ops.linear` (all cores for GEMVs),
and `project`: a norm followed by projections of its output."""

from __future__ import annotations

from torch import Tensor, nn

from retnet.ops.linear import linear
from retnet.ops.low_rank import LowRank
from retnet.ops.norm_linear import layer_norm_linear


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameters and state-dict keys) for RetNet's projections."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)

    def projection(self) -> tuple[Tensor, LowRank | None] | None:
        """(weight, LoRA update or None) where a fused path may compute this projection
        itself; None for subclasses it does not know (quantised weights, other layouts)."""
        return (self.weight, None) if type(self) is Linear else None


def project(x: Tensor, norm: nn.Module, linears: list[nn.Module]) -> list[Tensor]:
    """[p(norm(x)) for p in linears]. A LayerNorm with plain float projections (LoRA-wrapped
    ones too) is one operation (`retnet.ops.norm_linear`: under autograd, a function that keeps
    x for the backward and recomputes norm(x) there)."""
    parts = [p.projection() if isinstance(p, Linear) else None for p in linears]
    if (type(norm) is nn.LayerNorm and norm.elementwise_affine and norm.bias is not None
            and all(part is not None for part in parts)):
        weights, lows = zip(*parts)
        return layer_norm_linear(x, norm.weight, norm.bias, norm.eps, list(weights), list(lows))
    x = norm(x)
    return [p(x) for p in linears]
