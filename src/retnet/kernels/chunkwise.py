"""The chunkwise form as one autograd Function: the fast path for training and prefill
(`Form(backend="auto")`, chosen by `retnet.kernels.dispatch`).

Same recurrence and signature as `retnet.ops.retention.retention_chunkwise` (the reference),
computed differently:

- one transpose of q, k, v into a chunk-major [N, B, H, L, ·] layout, then every per-chunk
  product is a batched matmul on contiguous blocks (the reference's einsums permute and copy
  per call), and any run of chunks is a contiguous slice;
- the chunk states are scanned in place in one buffer [N + 1, B, H, K, V] that holds the
  incoming state and then every chunk's write: slot j + 1 += γ^(total_j) · slot j turns it
  into the states entering the chunks, with no copy per chunk;
- products that are known to be zero are skipped: the read of a zero incoming state (a
  training step; checked on the CPU only, where it costs no device synchronisation), the last
  chunk's write in the backward when the final state gets no gradient, the first chunk's
  share of the incoming state's gradient when that state needs none;
- without a mask the decay factors depend on the position in the chunk only, so they are
  [H, L, L] and [H, L], shared by every row and chunk, not [N, B, H, L, L]; document
  boundaries (resets) zero them where a reset lies between two positions (a `where` over
  the shared factors, not an exponential per row and chunk);
- the backward keeps only q, k, v (in that layout) and the incoming state: the L×L scores,
  every chunk's write to the state and every chunk's incoming state [N, B, H, K, V] are
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
    """The decay factors of a chunked sequence, for pos [Nm, Bm, L] (real tokens so far in
    the chunk; Nm, Bm are 1 when every chunk and row has the same positions) and docs
    [N, B, L] (resets so far in the chunk; None: no document starts in any chunk)."""

    def __init__(self, pos: Tensor, log_decay: Tensor, docs: Tensor | None = None) -> None:
        lg = log_decay[:, None]  # [H, 1]
        total = pos[..., -1:]  # [Nm, Bm, 1]
        self.pos, self.total = pos, total
        self.q = (pos.unsqueeze(2) * lg).exp()  # [Nm, Bm, H, L]: γ^p
        self.k = ((total - pos).unsqueeze(2) * lg).exp()  # γ^(total − p)
        self.chunk = (total * log_decay).exp()  # [Nm, Bm, H]: γ^total
        L = pos.shape[-1]
        self.dist = pos[..., :, None] - pos[..., None, :]  # [Nm, Bm, L, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=pos.device).tril()
        # masked in log space before exp: above the diagonal the exponent would be positive
        self.matrix = (self.dist.unsqueeze(2) * lg[..., None]).masked_fill(
            ~causal, float("-inf")).exp()  # [Nm, Bm, H, L, L]
        if docs is not None:
            self._split(docs)

    def _split(self, docs: Tensor) -> None:
        """Zero each factor across a document start: the scores between documents, the read
        of the incoming state after a reset (d ≠ 0), the write of keys before the chunk's last
        document (d ≠ d_last) and the carry of the state over a chunk with a reset. The
        factors become [N, B, ...]; zero factors add nothing to the decay's gradient."""
        zero = self.q.new_zeros(())
        first = (docs == 0).unsqueeze(2)  # [N, B, 1, L]
        last = (docs == docs[..., -1:]).unsqueeze(2)
        self.q = torch.where(first, self.q, zero)  # [N, B, H, L]
        self.k = torch.where(last, self.k, zero)
        self.chunk = torch.where(first[..., -1], self.chunk, zero)  # [N, B, H]
        same = (docs[..., :, None] == docs[..., None, :]).unsqueeze(2)  # [N, B, 1, L, L]
        self.matrix = torch.where(same, self.matrix, zero)  # [N, B, H, L, L]


def _take(x: Tensor, chunks: slice) -> Tensor:
    """Chunks of a factor [Nm, ...] that is shared by every chunk when Nm = 1."""
    return x if x.shape[0] == 1 else x[chunks]


def _blocks(x: Tensor, N: int, L: int) -> Tensor:
    """[B, T, H, D] → contiguous [N, B, H, L, D], zero-padding T up to N·L."""
    B, T, H, D = x.shape
    if N * L != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * L - T))
    return x.view(B, N, L, H, D).permute(1, 0, 3, 2, 4).contiguous()


def _unblock(x: Tensor, T: int) -> Tensor:
    """[N, B, H, L, D] → [B, T, H, D] (contiguous), dropping the padding."""
    N, B, H, L, D = x.shape
    x = x.permute(1, 0, 3, 2, 4).reshape(B, N * L, H, D)
    return x if N * L == T else x[:, :T].contiguous()


def _flat(x: Tensor) -> Tensor:
    """[N, B, H, ·, ·] (contiguous) → [N·B·H, ·, ·] (a view) for bmm."""
    return x.view(-1, x.shape[-2], x.shape[-1])


def _scores(q: Tensor, k: Tensor, dec: _Decays) -> Tensor:
    """(q kᵀ) ⊙ D within every chunk: [N, B, H, L, L]."""
    return torch.matmul(q, k.transpose(-1, -2)).mul_(dec.matrix)


def _states(kd: Tensor, v: Tensor, state: Tensor, chunk: Tensor, count: int) -> Tensor:
    """The states entering chunks 0 … count − 1 (count = N + 1: the final state too), as
    slots of one buffer [count, B, H, K, V]: S_(j+1) = γ^(total_j) S_j + (k ⊙ γ^(total − p))_jᵀ v_j.
    kd, v: [N, B, H, L, ·]; chunk: [N or 1, B or 1, H]."""
    buf = state.new_empty((count, *state.shape))
    buf[0] = state
    if count > 1:  # every chunk's write, in the slot after its own
        torch.matmul(kd[:count - 1].transpose(-1, -2), v[:count - 1], out=buf[1:])
    for j in range(count - 1):  # in place: slot j + 1 becomes the state after chunk j
        buf[j + 1].addcmul_(_take(chunk, slice(j, j + 1))[0, ..., None, None], buf[j])
    return buf


class ChunkwiseRetention(torch.autograd.Function):
    """(q, k, v, log_decay, state, mask, resets, chunk_size) → (o [B, T, H, V], final state),
    all in one compute dtype, k already masked (padding writes nothing), mask None = all
    real, resets None = one document per row."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                mask: Tensor | None, resets: Tensor | None, chunk_size: int
                ) -> tuple[Tensor, Tensor]:
        B, T = q.shape[:2]
        L = min(chunk_size, T)
        N = math.ceil(T / L)
        qb, kb, vb = (_blocks(x, N, L) for x in (q, k, v))
        dec = _Decays(_positions(mask, B, T, N, L, q), log_decay, _documents(resets, N, L))
        states = _states(kb * dec.k[..., None], vb, state, dec.chunk, N + 1)
        final = states[N].clone()
        # o = ((q kᵀ) ⊙ D) v + (q ⊙ γ^p) S_j, chunk by chunk as one batch of products; the
        # reads start at the first chunk whose incoming state is not known to be zero
        o = torch.matmul(_scores(qb, kb, dec), vb)
        z = _first_read(state)
        if z < N:
            qd = qb[z:] * _take(dec.q, slice(z, None))[..., None]
            _flat(o[z:]).baddbmm_(_flat(qd), _flat(states[z:N]))
        ctx.save_for_backward(qb, kb, vb, log_decay, state, mask, resets)
        ctx.shape = (T, N, L, z)
        return _unblock(o, T), final

    @staticmethod
    def backward(ctx, do: Tensor, dfinal: Tensor | None):
        qb, kb, vb, log_decay, state, mask, resets = ctx.saved_tensors
        T, N, L, z = ctx.shape
        B = qb.shape[1]
        dob = _blocks(do, N, L)
        dec = _Decays(_positions(mask, B, T, N, L, qb), log_decay, _documents(resets, N, L))
        kd = kb * dec.k[..., None]  # [N, B, H, L, K]
        incoming = _states(kd, vb, state, dec.chunk, N)  # S_0 … S_(N−1)
        # G_j, the gradient of the state entering chunk j: G_N = dfinal,
        # G_j = γ^(total_j) G_(j+1) + (q ⊙ γ^p)_jᵀ do_j; chunk j's write gets G_(j+1).
        # Needed: G_1 … G_N for the writes (G_N only if dfinal), G_0 for the state.
        lo = 0 if ctx.needs_input_grad[4] else 1
        w = N if dfinal is not None else N - 1  # chunks whose write gets a gradient
        grads = state.new_empty((N + 1, *state.shape))
        if lo < N:
            qd = qb[lo:] * _take(dec.q, slice(lo, None))[..., None]
            torch.matmul(qd.transpose(-1, -2), dob[lo:], out=grads[lo:N])
        if dfinal is not None:
            grads[N] = dfinal
        for j in reversed(range(lo, w)):  # in place: slot j becomes G_j
            grads[j].addcmul_(_take(dec.chunk, slice(j, j + 1))[0, ..., None, None],
                              grads[j + 1])
        g_writes = grads[1:w + 1]  # [w, B, H, K, V]: G_(j+1) for chunks j < w
        scores = _scores(qb, kb, dec)
        dv = torch.matmul(scores.transpose(-1, -2), dob)
        _flat(dv[:w]).baddbmm_(_flat(kd[:w]), _flat(g_writes))  # the writes' share
        dp = torch.matmul(dob, vb.transpose(-1, -2))  # [N, B, H, L, L]: d(scores)
        dq_in = torch.matmul(dob[z:], incoming[z:].transpose(-1, -2))  # d(q ⊙ γ^p), chunks ≥ z
        dkd = torch.matmul(vb[:w], g_writes.transpose(-1, -2))  # d(k ⊙ γ^(total − p)), < w
        dlog = None
        if ctx.needs_input_grad[3]:
            dlog = _decay_grad(dec, dp * scores, (z, dq_in * qb[z:]), (w, dkd * kb[:w]),
                               g_writes * incoming[:w])
        del scores
        ds = dp.mul_(dec.matrix)
        dq = torch.matmul(ds, kb)
        dq[z:].addcmul_(dq_in, _take(dec.q, slice(z, None))[..., None])
        dk = torch.matmul(ds.transpose(-1, -2), qb)
        dk[:w].addcmul_(dkd, _take(dec.k, slice(None, w))[..., None])
        dstate = grads[0].clone() if lo == 0 else None
        return _unblock(dq, T), _unblock(dk, T), _unblock(dv, T), dlog, dstate, None, None, None


def _first_read(state: Tensor) -> int:
    """1 when the incoming state is known to be zero (a CPU tensor with no non-zero entry:
    its first chunk reads nothing), else 0. Other devices are not asked: `any()` would wait
    for the device."""
    return int(state.device.type == "cpu" and not bool(state.any()))


def _positions(mask: Tensor | None, B: int, T: int, N: int, L: int, like: Tensor) -> Tensor:
    """Real tokens so far within each chunk: [1, 1, L] when every chunk is full and real,
    else [N, B, L]."""
    if mask is None and N * L == T:
        return torch.arange(1, L + 1, device=like.device, dtype=like.dtype).view(1, 1, L)
    m = like.new_ones(B, T) if mask is None else mask.to(like.dtype)
    if N * L != T:
        m = torch.nn.functional.pad(m, (0, N * L - T))
    return m.view(B, N, L).cumsum(-1).transpose(0, 1)


def _documents(resets: Tensor | None, N: int, L: int) -> Tensor | None:
    """Resets so far within each chunk, [N, B, L] (0: the chunk's first document, the one
    that reads the state entering the chunk), or None without resets."""
    if resets is None:
        return None
    B, T = resets.shape
    r = resets.to(torch.int32)
    if N * L != T:  # the padded tail starts no document
        r = torch.nn.functional.pad(r, (0, N * L - T))
    return r.view(B, N, L).cumsum(-1).transpose(0, 1)  # [N, B, L]


def _decay_grad(dec: _Decays, d_matrix: Tensor, d_q: tuple[int, Tensor],
                d_k: tuple[int, Tensor], d_chunk: Tensor) -> Tensor:
    """d loss / d log γ [H] from the gradients of each decay factor times the factor:
    d_matrix [N, B, H, L, L] = dD ⊙ D; d_q (first chunk z, [N − z, B, H, L, K]) for chunks
    z …; d_k (count w, [w, B, H, L, K]) and d_chunk [w, B, H, K, V] for chunks … w − 1
    (the others' are zero). Every factor is exp(count · log γ), so each adds
    Σ (its gradient · factor · count)."""
    (z, dq), (w, dk) = d_q, d_k
    first, until = slice(z, None), slice(None, w)
    pos, total = dec.pos.unsqueeze(2), dec.total  # [Nm, Bm, 1, L], [Nm, Bm, 1]
    parts = (
        (d_matrix * dec.dist.unsqueeze(2)).sum((-1, -2)),  # [N, B, H]
        (dq.sum(-1) * _take(dec.q, first) * _take(pos, first)).sum(-1),
        (dk.sum(-1) * _take(dec.k, until) * _take(total.unsqueeze(2) - pos, until)).sum(-1),
        d_chunk.sum((-1, -2)) * _take(dec.chunk, until) * _take(total, until),
    )
    return sum(p.sum((0, 1)) for p in parts)


def chunkwise_retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                        mask: Tensor | None, chunk_size: int, resets: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """The chunkwise form through `ChunkwiseRetention`; arguments as `retention_chunkwise`
    after its `_prepare` (compute dtype, k masked), except mask None = every token real."""
    return ChunkwiseRetention.apply(q, k, v, log_decay, state, mask, resets, chunk_size)


def chunkwise_form(form, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                   state: Tensor | None, mask: Tensor | None, resets: Tensor | None = None,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`Form("chunkwise")` through `ChunkwiseRetention` (shapes checked by the Form): the
    float32 inputs prepared as `retention_chunkwise` prepares them. Returns (o, final state)."""
    B, _, H, K = q.shape
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        log_decay = log_decay.to(device=q.device, dtype=torch.float32)
        state = (q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float())
        if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
            mask = None  # all real: shared decay factors (asked on the CPU only: no sync)
        if mask is not None:
            mask = mask.to(torch.float32)
            k = k * mask[:, :, None, None]  # a masked key writes nothing to the state
        return chunkwise_retention(q, k, v, log_decay, state, mask, form.chunk_size, resets)
