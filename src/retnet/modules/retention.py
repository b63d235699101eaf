"""Multi-scale retention (paper §2.2): projections, rotation, retention, normalisation, gate."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retnet.kernels.dispatch import choose
from retnet.modules.layout import fused_weight
from retnet.modules.linear import Linear, project
from retnet.ops import RetentionForm, decay_row_sum, log_decays, rotary_factors, rotate
from retnet.ops.gate import silu_gate
from retnet.ops.linear import linear


class Positions(NamedTuple):
    """The per-position inputs of retention, computed once per forward for all layers."""

    rotation: Tensor  # [B, T, 1, K/2] complex: e^(i·angle), complex64 (complex128 for float64)
    key_rotation: Tensor  # the same times K^-1/2, the keys' scale folded into their rotation
    sqrt_c: Tensor  # [B, T, H] √(decay row sum c_n), in the state's dtype
    resets: Tensor | None = None  # [B, T] bool: a document starts here (None: one per row)


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
                 use_gate: bool = True, head_norm: str = "group", rotation: bool = True) -> None:
        super().__init__()
        self.rotation = rotation
        self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
        self.decays = decays
        self._log_decay: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.q_proj = Linear(d_model, n_heads * key_dim)
        self.k_proj = Linear(d_model, n_heads * key_dim)
        self.v_proj = Linear(d_model, n_heads * value_dim)
        self.g_proj = Linear(d_model, n_heads * value_dim) if use_gate else None
        self.out_proj = Linear(n_heads * value_dim, d_model)
        # "group": GroupNorm per head with affine (paper); "rms": RMS per head, no affine
        # (torchscale); "none": the paper's ablation.
        self.head_norm, self.norm_eps = head_norm, norm_eps
        self.group_norm = (nn.GroupNorm(n_heads, n_heads * value_dim, eps=norm_eps)
                           if head_norm == "group" else None)

    def log_decay(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """log γ per head, [H], built in float64; cached per (device, dtype) outside the
        state dict and the buffers, so that a .to(bf16) cannot round it."""
        key = (device, dtype)
        if key not in self._log_decay:
            self._log_decay[key] = log_decays(self.n_heads, self.decays, device=device,
                                              dtype=dtype)
        return self._log_decay[key]

    def input_projections(self) -> list[Linear]:
        """The projections of x: q, k, v and (if gated) g, in this order."""
        gate = [] if self.g_proj is None else [self.g_proj]
        return [self.q_proj, self.k_proj, self.v_proj, *gate]

    def fused_input(self) -> Tensor | None:
        """[ΣOUT, D]: the input projections as one weight when the decode layout has fused
        them (`retnet.modules.layout`), else None."""
        return fused_weight(self.input_projections())

    def _project(self, x: Tensor, norm: nn.Module | None) -> list[Tensor]:
        """q, k, v (and g) of norm(x) [..., D]: one product when the weights are fused."""
        fused = self.fused_input() if x.numel() == x.shape[-1] else None
        if fused is None:
            return project(x, nn.Identity() if norm is None else norm,
                           self.input_projections())
        x = x if norm is None else norm(x)
        return list(linear(x, fused).split([p.weight.shape[0]
                                            for p in self.input_projections()], dim=-1))

    def encode_positions(self, positions: Tensor, dtype: torch.dtype,
                         resets: Tensor | None = None) -> Positions:
        """What this layer needs from the absolute positions [B, T] (restarting at each
        document start in `resets`); identical for every layer of a model, so the model
        computes it once per forward. dtype: the state's dtype."""
        # Without rotation every angle is 0: factors of exactly 1, the same code path.
        angles_at = positions if self.rotation else torch.zeros_like(positions)
        rotation = rotary_factors(angles_at, self.key_dim, dtype)
        log_decay = self.log_decay(positions.device, dtype)
        return Positions(rotation, rotation * self.key_dim**-0.5,
                         decay_row_sum(positions, log_decay).sqrt(), resets)

    def forward(self, x: Tensor, kv: Tensor, pos: Positions, mask: Tensor | None,
                form: RetentionForm, norm: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, D]; kv [B, H, K, V+1]; pos: `encode_positions` of the absolute positions
        [B, T] (and the document starts); mask [B, T] (1 = real; None: every token is); norm:
        applied to x first (the block's pre-norm).

        Returns y [B, T, D] and the new kv [B, H, K, V+1].
        """
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        q, k, v, *g = self._project(x, norm)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        q, k = rotate(q, pos.rotation), rotate(k, pos.key_rotation)  # k scaled by K^-1/2 too
        # A constant-1 column on v makes the same recurrence carry z_n = Σ γ^(p_n − p_m) k_m,
        # so column V of the output is q_n · z_n, the row sum of the retention scores.
        ones = (v.new_ones(()) if mask is None else mask.to(v.dtype)[:, :, None, None]
                ).expand(B, T, H, 1)
        log_decay = self.log_decay(x.device, kv.dtype)
        o, kv = form(q, k, torch.cat([v, ones], dim=-1), log_decay, kv, mask, pos.resets)
        if g and self.group_norm is not None:
            # the division, GroupNorm, gate and W_O below in one fused pass where the table
            # chooses one (W_O inside when it is a plain float weight: its input is recomputed)
            gn = self.group_norm
            w_o, low = (self.out_proj.projection() if isinstance(self.out_proj, Linear)
                        else None) or (None, None)
            args = (o, pos.sqrt_c, g[0], gn.weight, gn.bias, gn.eps, w_o)
            fast = choose("head_norm_gate", *args, low=low)
            if fast is not None:
                y = fast(*args, low=low)
                return (y if w_o is not None else self.out_proj(y)).to(x.dtype), kv
        # The reference. split, not o[..., :V] and o[..., V]: their backward would zero-fill
        # two [B, T, H, V+1] gradients; split's backward concatenates.
        o, score_sum = o.split([V, 1], dim=-1)
        o = o / torch.maximum(score_sum.abs(), pos.sqrt_c.unsqueeze(-1))  # [B, T, H, V]
        o = self._normalise_heads(o).reshape(B, T, H * V)
        if g:
            o = silu_gate(g[0], o)  # keeps g and o for the backward, not silu(g) as well
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
