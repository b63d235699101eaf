"""nn.Linear without bias whose product goes through `retnet.ops.linear` (all cores for GEMVs)."""

from __future__ import annotations

from torch import Tensor, nn

from retnet.ops.linear import linear


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameters and state-dict keys) for RetNet's projections."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)
