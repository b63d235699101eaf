"""nn.Linear without bias whose product goes through `retnet.ops.linear` (all cores for GEMVs),
and `project`: a norm followed by projections of its output."""

from __future__ import annotations

from torch import Tensor, nn

from retnet.ops.linear import linear
from retnet.ops.norm_linear import layer_norm_linear


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameters and state-dict keys) for RetNet's projections."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


def project(x: Tensor, norm: nn.Module, linears: list[nn.Module]) -> list[Tensor]:
    """[p(norm(x)) for p in linears]. A LayerNorm with plain float projections is one operation
    (`retnet.ops.norm_linear`: under autograd, a function that keeps x for the backward and
    recomputes norm(x) there)."""
    if (type(norm) is nn.LayerNorm and norm.elementwise_affine and norm.bias is not None
            and all(type(p) is Linear for p in linears)):
        return layer_norm_linear(x, norm.weight, norm.bias, norm.eps, [p.weight for p in linears])
    x = norm(x)
    return [p(x) for p in linears]
