"""An independent float64 reference of the whole RetNet language model, one token at a time.

Written from the equations as docs/implementation-notes.md states them. It imports nothing from
`retnet`: the config is a plain dict (`RetNetConfig.to_dict()`), the weights are looked up by
their `model.state_dict()` names, and the key sum z is a state of its own (the model carries it
as column V of its state). Every row and every token is a separate step of the recurrence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64
# The state in the model's layout: kv[layer] [B, H, K, V+1] (column V = z), offset [B] int64.
State = tuple[Sequence[Tensor], Tensor]


def decay_rates(config: dict) -> list[float]:
    """γ_h per head as Python floats (float64), from the scheme's formula."""
    H, scheme = config["n_heads"], config["decays"]
    if scheme == "multiscale":
        # 1 − γ log-spaced from 1/32 to 1/512 over the heads (paper §3.1).
        lo, hi = math.log(1 / 32), math.log(1 / 512)
        return [1 - math.exp(lo + (hi - lo) * h / max(H - 1, 1)) for h in range(H)]
    if scheme == "eq8":  # paper eq. 8: γ_h = 1 − 2^(−5−h)
        return [1 - 2.0 ** (-5 - h) for h in range(H)]
    if scheme == "none":
        return [1.0] * H
    if scheme == "single":
        return [127 / 128] * H
    raise ValueError(f"unknown decay scheme {scheme!r}")


@functools.cache
def decay_row_sum(gamma: float, p: int) -> float:
    """c = Σ_(i=0..p) γ^i, term by term (fsum rounds the sum once): no closed form."""
    return math.fsum(gamma**i for i in range(p + 1))


def rotate(x: Tensor, p: int) -> Tensor:
    """x [H, K] at absolute position p: pair (x_2i, x_2i+1) turns by the angle p·θ_i,
    θ = 10000^(−linspace(0, 1, K/2)), formed in float64."""
    theta = 10000.0 ** -torch.linspace(0, 1, x.shape[-1] // 2, dtype=F64)  # [K/2]
    cos, sin = (p * theta).cos(), (p * theta).sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [H, K/2] each
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """Over the last dim; bias None means RMS normalisation (no centring)."""
    if bias is None:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm and GroupNorm
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def swish(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


class _Weights:
    """The state dict in float64, read by name; `norm(name, x)` applies the model's pre-norm."""

    def __init__(self, config: dict, weights: dict[str, Tensor]) -> None:
        self.c = config
        self.w = {name: t.detach().to("cpu", F64) for name, t in weights.items()}

    def __getitem__(self, name: str) -> Tensor:
        return self.w[name]

    def norm(self, prefix: str, x: Tensor) -> Tensor:
        bias = self.w[f"{prefix}.bias"] if self.c["norm"] == "layer" else None
        return layer_norm(x, self.w[f"{prefix}.weight"], bias, self.c["norm_eps"])


def retention_step(w: _Weights, prefix: str, x: Tensor, S: Tensor, z: Tensor, p: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """One real token through one retention layer. x [D]; S [H, K, V]; z [H, K]; p its position.

    Returns y [D] and the new S, z.
    """
    c = w.c
    H, K, V = S.shape
    gammas = decay_rates(c)
    gamma = torch.tensor(gammas, dtype=F64)  # [H]
    # 1. projections, one vector per head
    q = (w[f"{prefix}.q_proj.weight"] @ x).view(H, K)
    k = (w[f"{prefix}.k_proj.weight"] @ x).view(H, K)
    v = (w[f"{prefix}.v_proj.weight"] @ x).view(H, V)
    # 2. rotation by the absolute position; keys scaled by K^−1/2
    q, k = rotate(q, p), rotate(k, p) * K**-0.5
    # 3. the recurrence: S_n = γ S_(n−1) + k_nᵀ v_n and the key sum z_n = γ z_(n−1) + k_n
    S = gamma[:, None, None] * S + k[:, :, None] * v[:, None, :]  # [H, K, V]
    z = gamma[:, None] * z + k  # [H, K]
    # 4. normalised read-out: o_n = q_n S_n / max(|q_n · z_n|, √c_n), c_n = Σ_(i ≤ p) γ^i
    sqrt_c = torch.tensor([math.sqrt(decay_row_sum(g, p)) for g in gammas], dtype=F64)  # [H]
    score_sum = (q * z).sum(-1)  # [H]
    o = (q[:, :, None] * S).sum(1) / torch.maximum(score_sum.abs(), sqrt_c)[:, None]  # [H, V]
    # 5. per-head normalisation over each head's V values
    eps = c["norm_eps"]
    if c["head_norm"] == "group":
        o = layer_norm(o, w[f"{prefix}.group_norm.weight"].view(H, V),
                       w[f"{prefix}.group_norm.bias"].view(H, V), eps)
    elif c["head_norm"] == "rms":
        o = layer_norm(o, torch.ones(V, dtype=F64), None, eps)
    o = o.reshape(H * V)
    # 6. swish gate, 7. output projection
    if c["use_gate"]:
        o = swish(w[f"{prefix}.g_proj.weight"] @ x) * o
    return w[f"{prefix}.out_proj.weight"] @ o, S, z


def feed_forward(w: _Weights, prefix: str, x: Tensor) -> Tensor:
    """gelu: W_down gelu(W_up x); glu-<act>: W_down (act(W_up x) ⊙ W_gate x). x [D]."""
    kind = w.c["ffn"]
    act = gelu if kind in ("gelu", "glu-gelu") else swish
    h = act(w[f"{prefix}.up.weight"] @ x)
    if kind.startswith("glu"):
        h = h * (w[f"{prefix}.gate.weight"] @ x)
    return w[f"{prefix}.down.weight"] @ h


def reference_forward(config: dict, weights: dict[str, Tensor], input_ids: Tensor,
                      attention_mask: Tensor | None = None, state: State | None = None
                      ) -> tuple[Tensor, State]:
    """The language model, per row and per token, in float64.

    Args:
        config: `RetNetConfig.to_dict()`. weights: `model.state_dict()` (any dtype).
        input_ids: [B, T]. attention_mask: optional [B, T], 1 = real token.
        state: optional incoming (kv, offset) in the model's layout (a `RetNetState` works).
    Returns:
        logits [B, T, vocab] float64, NaN at masked positions (they have no output), and the
        state after the last position: kv[layer] [B, H, K, V+1] float64 with z in column V,
        offset [B] int64 (real tokens consumed).
    """
    w = _Weights(config, weights)
    L, H, D = config["n_layers"], config["n_heads"], config["d_model"]
    K = D // H
    V = (config["value_dim"] or 2 * D) // H
    B, T = input_ids.shape
    mask = (torch.ones(B, T, dtype=torch.bool) if attention_mask is None
            else attention_mask.to("cpu", torch.bool))
    logits = torch.full((B, T, config["vocab_size"]), math.nan, dtype=F64)
    kv_out = [torch.zeros(B, H, K, V + 1, dtype=F64) for _ in range(L)]
    offsets = []
    for b in range(B):
        # 0. row b's incoming state, S [H, K, V] and z [H, K] per layer, and its position
        if state is None:
            S = [torch.zeros(H, K, V, dtype=F64) for _ in range(L)]
            z = [torch.zeros(H, K, dtype=F64) for _ in range(L)]
            p = 0
        else:
            kv, offset = state
            S = [kv[i][b, ..., :V].to("cpu", F64) for i in range(L)]
            z = [kv[i][b, ..., V].to("cpu", F64) for i in range(L)]
            p = int(offset[b])
        for t in range(T):
            # 1. padding neither decays nor writes nor advances the position
            if not mask[b, t]:
                continue
            x = w["embed.weight"][int(input_ids[b, t])]  # [D]
            if config["scale_embeddings"]:
                x = x * math.sqrt(D)
            # 2. each block: x + MSR(norm1(x)), then x + FFN(norm2(x)) (paper eq. 9)
            for i in range(L):
                y, S[i], z[i] = retention_step(w, f"blocks.{i}.retention",
                                               w.norm(f"blocks.{i}.norm1", x), S[i], z[i], p)
                x = x + y
                x = x + feed_forward(w, f"blocks.{i}.ffn", w.norm(f"blocks.{i}.norm2", x))
            # 3. final norm and the LM head (the embedding matrix when tied)
            head = w["embed.weight"] if config["tie_embeddings"] else w["lm_head.weight"]
            logits[b, t] = head @ w.norm("norm", x)
            p += 1
        for i in range(L):
            kv_out[i][b] = torch.cat([S[i], z[i][..., None]], dim=-1)
        offsets.append(p)
    return logits, (tuple(kv_out), torch.tensor(offsets, dtype=torch.long))


def reference_logits(config: dict, weights: dict[str, Tensor], input_ids: Tensor,
                     attention_mask: Tensor | None = None, state: State | None = None) -> Tensor:
    """logits [B, T, vocab] float64 of `reference_forward` (NaN at masked positions)."""
    return reference_forward(config, weights, input_ids, attention_mask, state)[0]
