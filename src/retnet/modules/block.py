"""The RetNet block: pre-norm residual multi-scale retention, then a pre-norm residual FFN."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from retnet.modules.retention import MultiScaleRetention
from retnet.ops import RetentionForm


class FeedForward(nn.Module):
    """Two projections with GELU between them (paper §3.1: hidden size 2d)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class RetNetBlock(nn.Module):
    """Y = MSR(LN(X)) + X;  X' = FFN(LN(Y)) + Y  (paper eq. 9)."""

    def __init__(self, d_model: int, n_heads: int, key_dim: int, value_dim: int, ffn_dim: int,
                 *, decays: str, norm_eps: float, dropout: float,
                 use_gate: bool = True, use_group_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.retention = MultiScaleRetention(d_model, n_heads, key_dim, value_dim, decays=decays,
                                             norm_eps=norm_eps, use_gate=use_gate,
                                             use_group_norm=use_group_norm)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = FeedForward(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, kv: Tensor, positions: Tensor, mask: Tensor,
                form: RetentionForm) -> tuple[Tensor, Tensor]:
        """x [B, T, D]; kv [B, H, K, V+1]; returns the new x and kv."""
        h, kv = self.retention(self.norm1(x), kv, positions, mask, form)
        x = x + self.dropout(h)
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x, kv
