"""The RetNet block: pre-norm residual multi-scale retention, then a pre-norm residual FFN."""

from __future__ import annotations

from torch import Tensor, nn

from retnet.modules.linear import Linear, project
from retnet.modules.retention import MultiScaleRetention, Positions
from retnet.ops import RetentionForm
from retnet.ops.activation import ACTIVATIONS, act_linear


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm (the paper) or RMSNorm with a weight (torchscale)."""
    return nn.LayerNorm(dim, eps=eps) if kind == "layer" else nn.RMSNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """"gelu": down(gelu(up(x))) (paper §3.1, hidden 2d); "glu-gelu" / "glu-swish":
    down(act(up(x)) ⊙ gate(x)) (torchscale's GLU)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "gelu") -> None:
        super().__init__()
        self.up = Linear(d_model, hidden)
        self.gate = Linear(d_model, hidden) if kind.startswith("glu") else None
        self.down = Linear(hidden, d_model)
        self.kind = kind.removeprefix("glu-")
        self.act = ACTIVATIONS[self.kind]

    def forward(self, x: Tensor, norm: nn.Module | None = None) -> Tensor:
        """x [B, T, D] → [B, T, D], of norm(x) when a norm is given (the block's pre-norm)."""
        inputs = [self.up] if self.gate is None else [self.up, self.gate]
        up, *gate = project(x, nn.Identity() if norm is None else norm, inputs)
        down = self.down.projection() if isinstance(self.down, Linear) else None
        if not gate and down is not None:
            # one operation: under autograd it keeps up(x) only, act(up x) is recomputed
            return act_linear(up, down[0], self.kind, down[1])
        h = self.act(up)
        return self.down(h if not gate else h * gate[0])


class RetNetBlock(nn.Module):
    """Y = MSR(LN(X)) + X;  X' = FFN(LN(Y)) + Y  (paper eq. 9)."""

    def __init__(self, d_model: int, n_heads: int, key_dim: int, value_dim: int, ffn_dim: int,
                 *, decays: str, norm_eps: float, dropout: float, norm: str = "layer",
                 head_norm: str = "group", ffn: str = "gelu", use_gate: bool = True,
                 rotation: bool = True) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.retention = MultiScaleRetention(d_model, n_heads, key_dim, value_dim, decays=decays,
                                             norm_eps=norm_eps, use_gate=use_gate,
                                             head_norm=head_norm, rotation=rotation)
        self.norm2 = make_norm(norm, d_model, norm_eps)
        self.ffn = FeedForward(d_model, ffn_dim, ffn)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, pos: Positions, mask: Tensor | None,
                form: RetentionForm) -> tuple[Tensor, Tensor]:
        """x [B, T, D]; kv [B, H, K, V+1]; pos as MultiScaleRetention; returns new x, kv."""
        h, kv = self.retention(x, kv, pos, mask, form, norm=self.norm1)
        x = x + self.dropout(h)
        x = x + self.dropout(self.ffn(x, norm=self.norm2))
        return x, kv
