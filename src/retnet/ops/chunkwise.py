"""The chunkwise form as one autograd Function: the fast path for training and prefill.

Same recurrence and signature as `retention_chunkwise` (the reference), computed differently:

- one transpose of q, k, v into a [B, H, N, L, ·] layout, then every per-chunk product is a
  batched matmul on contiguous blocks (the reference's einsums permute and copy per call);
- without a mask the decay factors depend on the position in the chunk only, so they are
  [H, L, L] and [H, L], shared by every row and chunk, not [B, N, H, L, L];
- the backward keeps only q, k, v (in that layout) and the incoming state: the L×L scores,
  every chunk's write to the state and every chunk's incoming state [B, H, N, K, V] are
  recomputed there, one layer at a time, instead of held for the whole forward pass;
- the backward writes each gradient once (no zero-filled full-size buffers).

`ChunkwiseRetention.forward`/`backward` are the two functions a device kernel implements
(the GPU kernels of `retnet.kernels.triton_retention` take the same arguments).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _Decays:
    """The decay factors of a chunked sequence, for pos [Bm, Nm, L] (real tokens so far in
    the chunk; Bm, Nm are 1 when every row and chunk has the same positions)."""

    def __init__(self, pos: Tensor, log_decay: Tensor) -> None:
        lg = log_decay[:, None, None, None]  # [H, 1, 1, 1]
        total = pos[..., -1:]  # [Bm, Nm, 1]
        self.pos, self.total = pos, total
        self.q = (pos.unsqueeze(1) * lg[..., 0]).exp()  # [Bm, H, Nm, L]: γ^p
        self.k = ((total - pos).unsqueeze(1) * lg[..., 0]).exp()  # γ^(total − p)
        self.chunk = (total[..., 0].unsqueeze(1) * lg[..., 0, 0]).exp()  # [Bm, H, Nm]: γ^total
        L = pos.shape[-1]
        self.dist = pos[..., :, None] - pos[..., None, :]  # [Bm, Nm, L, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=pos.device).tril()
        # masked in log space before exp: above the diagonal the exponent would be positive
        self.matrix = (self.dist.unsqueeze(1) * lg).masked_fill(~causal, float("-inf")).exp()


def _blocks(x: Tensor, N: int, L: int) -> Tensor:
    """[B, T, H, D] → contiguous [B, H, N, L, D], zero-padding T up to N·L."""
    B, T, H, D = x.shape
    if N * L != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * L - T))
    return x.view(B, N, L, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _unblock(x: Tensor, T: int) -> Tensor:
    """[B, H, N, L, D] → [B, T, H, D] (contiguous), dropping the padding."""
    B, H, N, L, D = x.shape
    x = x.permute(0, 2, 3, 1, 4).reshape(B, N * L, H, D)
    return x if N * L == T else x[:, :T].contiguous()


def _flat(x: Tensor) -> Tensor:
    """[B, H, N, ·, ·] → [B·H·N, ·, ·] (a view) for bmm."""
    return x.view(-1, x.shape[-2], x.shape[-1])


def _scores(q: Tensor, k: Tensor, dec: _Decays) -> Tensor:
    """(q kᵀ) ⊙ D within every chunk: [B, H, N, L, L]."""
    return torch.matmul(q, k.transpose(-1, -2)).mul_(dec.matrix)


def _incoming(k: Tensor, v: Tensor, state: Tensor, dec: _Decays) -> tuple[Tensor, Tensor]:
    """The state entering every chunk [B, H, N, K, V] and the final state [B, H, K, V]:
    S_(j+1) = γ^(total_j) S_j + Σ_s γ^(total_j − p_s) k_sᵀ v_s."""
    kv = torch.matmul((k * dec.k[..., None]).transpose(-1, -2), v)  # [B, H, N, K, V]
    chunk = dec.chunk.expand(kv.shape[0], -1, kv.shape[2])  # [B, H, N]
    # in place: chunk j's write is read, then its slot receives the state entering chunk j
    for j in range(kv.shape[2]):
        write = kv[:, :, j].clone()
        kv[:, :, j] = state
        state = torch.addcmul(write, chunk[:, :, j, None, None], state)
    return kv, state


class ChunkwiseRetention(torch.autograd.Function):
    """(q, k, v, log_decay, state, mask, chunk_size) → (o [B, T, H, V], final state), all in
    one compute dtype, k already masked (padding writes nothing), mask None = all real."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                mask: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
        B, T = q.shape[:2]
        L = min(chunk_size, T)
        N = math.ceil(T / L)
        qb, kb, vb = (_blocks(x, N, L) for x in (q, k, v))
        pos = _positions(mask, B, T, N, L, q)
        dec = _Decays(pos, log_decay)
        incoming, final = _incoming(kb, vb, state, dec)
        # o = (q ⊙ γ^p) S_j + ((q kᵀ) ⊙ D) v, chunk by chunk as one batch of products
        o = torch.matmul(qb * dec.q[..., None], incoming)
        del incoming
        _flat(o).baddbmm_(_flat(_scores(qb, kb, dec)), _flat(vb))
        ctx.save_for_backward(qb, kb, vb, log_decay, state, mask)
        ctx.shape = (T, N, L)
        return _unblock(o, T), final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        qb, kb, vb, log_decay, state, mask = ctx.saved_tensors
        T, N, L = ctx.shape
        B = qb.shape[0]
        dob = _blocks(do, N, L)
        pos = _positions(mask, B, T, N, L, qb)
        dec = _Decays(pos, log_decay)
        incoming, _ = _incoming(kb, vb, state, dec)
        qd = qb * dec.q[..., None]  # [B, H, N, L, K]
        kd = kb * dec.k[..., None]
        # G_j, the gradient of the state entering chunk j: G_N = dfinal,
        # G_j = γ^(total_j) G_(j+1) + (q ⊙ γ^p)_jᵀ do_j. Chunk j's write gets G_(j+1).
        grad_out = torch.matmul(qd.transpose(-1, -2), dob)  # [B, H, N, K, V]: (q ⊙ γ^p)ᵀ do
        g = state.new_zeros(state.shape) if dfinal is None else dfinal
        chunk = dec.chunk.expand(B, -1, N)
        for j in reversed(range(N)):  # in place: slot j then receives G_(j+1)
            q_do = grad_out[:, :, j].clone()
            grad_out[:, :, j] = g
            g = torch.addcmul(q_do, chunk[:, :, j, None, None], g)
        scores = _scores(qb, kb, dec)
        dv = torch.matmul(kd, grad_out)  # the writes' share
        _flat(dv).baddbmm_(_flat(scores).transpose(1, 2), _flat(dob))
        dp = torch.matmul(dob, vb.transpose(-1, -2))  # [B, H, N, L, L]: d(scores)
        dq_in = torch.matmul(dob, incoming.transpose(-1, -2))  # d(q ⊙ γ^p)
        dkd = torch.matmul(vb, grad_out.transpose(-1, -2))  # d(k ⊙ γ^(total − p))
        dlog = None
        if ctx.needs_input_grad[3]:
            dlog = _decay_grad(dec, dp * scores, dq_in * qb, dkd * kb, grad_out * incoming)
        del scores, incoming
        ds = dp.mul_(dec.matrix)
        dq = torch.matmul(ds, kb)
        dq.addcmul_(dq_in, dec.q[..., None])
        dk = torch.matmul(ds.transpose(-1, -2), qb)
        dk.addcmul_(dkd, dec.k[..., None])
        return _unblock(dq, T), _unblock(dk, T), _unblock(dv, T), dlog, g, None, None


def _positions(mask: Tensor | None, B: int, T: int, N: int, L: int, like: Tensor) -> Tensor:
    """Real tokens so far within each chunk: [1, 1, L] when every chunk is full and real,
    else [B, N, L]."""
    if mask is None and N * L == T:
        return torch.arange(1, L + 1, device=like.device, dtype=like.dtype).view(1, 1, L)
    m = like.new_ones(B, T) if mask is None else mask.to(like.dtype)
    if N * L != T:
        m = torch.nn.functional.pad(m, (0, N * L - T))
    return m.view(B, N, L).cumsum(-1)


def _decay_grad(dec: _Decays, d_matrix: Tensor, d_q: Tensor, d_k: Tensor, d_chunk: Tensor
                ) -> Tensor:
    """d loss / d log γ [H] from the gradients of each decay factor times the factor
    (d_matrix [B, H, N, L, L] = dD ⊙ D, d_q, d_k [B, H, N, L, K], d_chunk [B, H, N, K, V]):
    every factor is exp(count · log γ), so each adds Σ (its gradient · factor · count)."""
    total = dec.total[..., 0].unsqueeze(1)  # [Bm, 1, Nm]
    parts = (
        (d_matrix * dec.dist.unsqueeze(1)).sum((-1, -2)),  # [B, H, N]
        (d_q.sum(-1) * dec.q * dec.pos.unsqueeze(1)).sum(-1),
        (d_k.sum(-1) * dec.k * (dec.total - dec.pos).unsqueeze(1)).sum(-1),
        d_chunk.sum((-1, -2)) * dec.chunk * total,
    )
    return sum(p.sum((0, 2)) for p in parts)


def chunkwise_retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                        mask: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The chunkwise form through `ChunkwiseRetention`; arguments as `retention_chunkwise`
    after its `_prepare` (compute dtype, k masked), except mask None = every token real."""
    return ChunkwiseRetention.apply(q, k, v, log_decay, state, mask, chunk_size)
