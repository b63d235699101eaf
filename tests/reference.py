"""A float64 per-token reference of masked retention, written as plainly as possible."""

from __future__ import annotations

import torch
from torch import Tensor


def reference_retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                        state: Tensor | None = None, mask: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """For each row b and head h, one token at a time:

        if token t is real:  S = γ_h S + k_tᵀ v_t
        o_t = q_t S
    """
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, K = q.shape
    V = v.shape[-1]
    gamma = log_decay.double().exp()
    rows = []
    finals = []
    for b in range(B):
        heads = []
        head_finals = []
        for h in range(H):
            S = torch.zeros(K, V, dtype=torch.float64) if state is None else state[b, h].double()
            outs = []
            for t in range(T):
                if mask is None or bool(mask[b, t]):
                    S = gamma[h] * S + torch.outer(k[b, t, h], v[b, t, h])
                outs.append(q[b, t, h] @ S)
            heads.append(torch.stack(outs))  # [T, V]
            head_finals.append(S)
        rows.append(torch.stack(heads, dim=1))  # [T, H, V]
        finals.append(torch.stack(head_finals))  # [H, K, V]
    return torch.stack(rows), torch.stack(finals)


def rel_err(x: Tensor, ref: Tensor) -> float:
    """max|x − ref| / max|ref| over the whole tensor."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
