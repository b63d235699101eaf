"""Multi-scale retention (paper §2.2): projections, rotation, retention, normalisation, gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retnet.ops import RetentionForm, decay_row_sum, log_decays, rotary_angles, rotate


class MultiScaleRetention(nn.Module):
    """One retention layer with H heads of key dim K and value dim V, built from plain ints.

    Per head, with p_n the absolute position and c_n = Σ_(i ≤ p_n) γ^i:
        o_n = q_n S_n / max(|q_n · z_n|, √c_n)
    which is the paper's decay row normalisation (D/√c) followed by its score normalisation
    (divide by max(|row sum|, 1)), rewritten so that each factor is a per-position quantity
    that every form computes identically. Then GroupNorm per head, swish gate, W_O.
    """

    def __init__(self, d_model: int, n_heads: int, key_dim: int, value_dim: int, *,
                 decays: str = "multiscale", norm_eps: float = 1e-5,
                 use_gate: bool = True, head_norm: str = "group") -> None:
        super().__init__()
        self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
        self.decays = decays
        self.q_proj = nn.Linear(d_model, n_heads * key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, n_heads * value_dim, bias=False) if use_gate else None
        self.out_proj = nn.Linear(n_heads * value_dim, d_model, bias=False)
        # "group": GroupNorm per head with affine (paper); "rms": RMS per head, no affine
        # (torchscale); "none": the paper's ablation.
        self.head_norm, self.norm_eps = head_norm, norm_eps
        self.group_norm = (nn.GroupNorm(n_heads, n_heads * value_dim, eps=norm_eps)
                           if head_norm == "group" else None)

    def log_decay(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """log γ per head, [H], built in float64 and never stored (a .to(bf16) cannot round it)."""
        return log_decays(self.n_heads, self.decays, device=device, dtype=dtype)

    def forward(self, x: Tensor, kv: Tensor, positions: Tensor, mask: Tensor,
                form: RetentionForm) -> tuple[Tensor, Tensor]:
        """x [B, T, D]; kv [B, H, K, V+1]; positions [B, T] absolute; mask [B, T] (1 = real).

        Returns y [B, T, D] and the new kv [B, H, K, V+1].
        """
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, V)
        cos, sin = rotary_angles(positions, K)
        q = rotate(q, cos, sin)
        k = rotate(k, cos, sin) * K**-0.5
        # A constant-1 column on v makes the same recurrence carry z_n = Σ γ^(p_n − p_m) k_m,
        # so column V of the output is q_n · z_n, the row sum of the retention scores.
        ones = mask.to(v.dtype)[:, :, None, None].expand(B, T, H, 1)
        log_decay = self.log_decay(x.device, kv.dtype)
        o, kv = form(q, k, torch.cat([v, ones], dim=-1), log_decay, kv, mask)
        sqrt_c = decay_row_sum(positions, log_decay).sqrt()  # [B, T, H]
        o = o[..., :V] / torch.maximum(o[..., V].abs(), sqrt_c).unsqueeze(-1)  # [B, T, H, V]
        o = self._normalise_heads(o).reshape(B, T, H * V)
        if self.g_proj is not None:
            o = F.silu(self.g_proj(x)) * o
        return self.out_proj(o.to(x.dtype)), kv

    def _normalise_heads(self, o: Tensor) -> Tensor:
        """o [B, T, H, V] in float32/64: each head normalised over its V values."""
        if self.head_norm == "rms":
            return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        if self.group_norm is None:
            return o
        B, T, H, V = o.shape
        gn = self.group_norm
        return F.group_norm(o.reshape(B * T, H * V), H, gn.weight.to(o.dtype),
                            gn.bias.to(o.dtype), gn.eps).view(B, T, H, V)
