"""Fused Triton kernels for retention: the chunkwise form, forward and backward, as one
autograd Function, and the one-token recurrent step. Same semantics and arguments as
`retnet.ops.retention` (masked positions neither decay nor write; a reset drops the state
entering its token, so each document of a packed row runs alone; decays γ^count as
exp(count · log γ) with no positive exponent; float32 state and accumulation).

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests them):
import this module only after that variable is set. Select them with
`Form(..., backend="triton")`; `retnet.kernels.dispatch` decides where they may run
(`chunkwise_form`, `recurrent_form`), with the PyTorch forms as reference and fallback.

Each program owns one (batch row, head) and one block of BV value columns and walks the
chunks in order, holding its [K, BV] slice of the state in registers: no tensor of every
chunk's incoming state is written, in the forward or the backward (which recomputes the
states on the way, as flash-linear-attention's fused_chunk kernels do). Products use
`tl.dot` in float32, as TF32 only where torch allows it (torch.backends.cuda.matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _chunk(ptr, b, t0, h, T, H, W, L, col, BL: tl.constexpr, BW: tl.constexpr):
    """Rows t0..t0+L of x[b, :, h, :] for x [B, T, H, W] contiguous, columns `col`, as
    float32 [BL, BW]; zeros outside (past T, past the chunk, past W)."""
    rl = tl.arange(0, BL)
    t = t0 + rl
    rows = (rl < L) & (t < T)
    offs = ((b * T + t) * H + h)[:, None] * W + col[None, :]
    return tl.load(ptr + offs, mask=rows[:, None] & (col[None, :] < W), other=0.0).to(tl.float32)


@triton.jit
def _store_chunk(ptr, x, b, t0, h, T, H, W, L, col, BL: tl.constexpr):
    rl = tl.arange(0, BL)
    t = t0 + rl
    rows = (rl < L) & (t < T)
    offs = ((b * T + t) * H + h)[:, None] * W + col[None, :]
    tl.store(ptr + offs, x, mask=rows[:, None] & (col[None, :] < W))


@triton.jit
def _positions(mask, b, t0, T, L, BL: tl.constexpr):
    """The chunk's mask m [BL], its running count of real tokens p [BL] and their total."""
    rl = tl.arange(0, BL)
    t = t0 + rl
    m = tl.load(mask + b * T + t, mask=(rl < L) & (t < T), other=0.0).to(tl.float32)
    p = tl.cumsum(m, 0)
    return m, p, tl.sum(m, 0)


@triton.jit
def _documents(resets, b, t0, T, L, BL: tl.constexpr):
    """The chunk's documents: d [BL], resets so far in the chunk (0: the document that reads
    the state entering the chunk), and the last one's id."""
    rl = tl.arange(0, BL)
    t = t0 + rl
    r = tl.load(resets + b * T + t, mask=(rl < L) & (t < T), other=0.0).to(tl.float32)
    d = tl.cumsum(r, 0)
    return d, tl.sum(r, 0)


@triton.jit
def _decay(p, d, lam, BL: tl.constexpr, LOWER: tl.constexpr):
    """γ^(p_l − p_s) where l ≥ s in one document (LOWER: D[l, s]) or its transpose (D[s, l]),
    else 0; the exponent is masked before exp, so none is positive."""
    rl = tl.arange(0, BL)
    same = d[:, None] == d[None, :]
    if LOWER:
        causal = (rl[:, None] >= rl[None, :]) & same
        dist = p[:, None] - p[None, :]
    else:
        causal = (rl[:, None] <= rl[None, :]) & same
        dist = p[None, :] - p[:, None]
    return tl.exp(tl.where(causal, lam * dist, float("-inf")))


@triton.jit
def _factors(p, P, d, D, lam):
    """γ^p where the incoming state is read (d = 0), γ^(P − p) where a key writes the state at
    the chunk's end (d = D), γ^P where the state crosses the chunk (no reset in it); 0 else."""
    q_in = tl.where(d == 0, tl.exp(lam * p), 0.0)
    to_end = tl.where(d == D, tl.exp(lam * (P - p)), 0.0)
    return q_in, to_end, tl.where(D == 0, tl.exp(lam * P), 0.0)


@triton.jit
def _state_block(ptr, bh, K, V, rk, rv):
    return tl.load(ptr + bh * K * V + rk[:, None] * V + rv[None, :],
                   mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0).to(tl.float32)


@triton.jit
def _store_state(ptr, x, bh, K, V, rk, rv):
    tl.store(ptr + bh * K * V + rk[:, None] * V + rv[None, :], x,
             mask=(rk[:, None] < K) & (rv[None, :] < V))


@triton.jit
def _fwd(q, k, v, mask, resets, log_decay, s0, o, s_out, T, H, K, V, L,
         BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """o = (Q Kᵀ ⊙ D) V + (γ^p ⊙ Q) S_j per chunk j, then S_(j+1) = γ^P S_j + (γ^(P−p) ⊙ K)ᵀ V
    (each factor zero across a document start: `_decay`, `_factors`)."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lam = tl.load(log_decay + h).to(tl.float32)
    rk, rv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    S = _state_block(s0, bh, K, V, rk, rv)  # [BK, BV]
    for j in range(0, tl.cdiv(T, L)):
        t0 = j * L
        m, p, P = _positions(mask, b, t0, T, L, BL)
        d, D = _documents(resets, b, t0, T, L, BL)
        q_in, to_end, carry = _factors(p, P, d, D, lam)
        qq = _chunk(q, b, t0, h, T, H, K, L, rk, BL, BK)
        kk = _chunk(k, b, t0, h, T, H, K, L, rk, BL, BK) * m[:, None]
        vv = _chunk(v, b, t0, h, T, H, V, L, rv, BL, BV)
        scores = tl.dot(qq, tl.trans(kk), input_precision=PREC) * _decay(p, d, lam, BL, True)
        out = tl.dot(scores, vv, input_precision=PREC)
        out += tl.dot(qq * q_in[:, None], S, input_precision=PREC)
        _store_chunk(o, out, b, t0, h, T, H, V, L, rv, BL)
        S = S * carry + tl.dot(tl.trans(kk * to_end[:, None]), vv, input_precision=PREC)
    _store_state(s_out, S, bh, K, V, rk, rv)


@triton.jit
def _bwd_dq(k, v, mask, resets, log_decay, s0, do, dq, share, T, H, K, V, L,
            BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq_l = Σ_(s ≤ l) D[l, s] (do_l · v_s) k_s + γ^(p_l) do_l S_jᵀ, from this program's
    value block (dq is [NV, B, T, H, K]: the blocks' shares, summed afterwards); the states
    S_j are recomputed on the way."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lam = tl.load(log_decay + h).to(tl.float32)
    rk, rv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    S = _state_block(s0, bh, K, V, rk, rv)
    dq_block = dq + iv * share  # share = B·T·H·K elements per value block
    for j in range(0, tl.cdiv(T, L)):
        t0 = j * L
        m, p, P = _positions(mask, b, t0, T, L, BL)
        d, D = _documents(resets, b, t0, T, L, BL)
        q_in, to_end, carry = _factors(p, P, d, D, lam)
        kk = _chunk(k, b, t0, h, T, H, K, L, rk, BL, BK) * m[:, None]
        vv = _chunk(v, b, t0, h, T, H, V, L, rv, BL, BV)
        dd = _chunk(do, b, t0, h, T, H, V, L, rv, BL, BV)
        a = tl.dot(dd, tl.trans(vv), input_precision=PREC) * _decay(p, d, lam, BL, True)
        g = tl.dot(a, kk, input_precision=PREC)
        g += tl.dot(dd, tl.trans(S), input_precision=PREC) * q_in[:, None]
        _store_chunk(dq_block, g, b, t0, h, T, H, K, L, rk, BL)
        S = S * carry + tl.dot(tl.trans(kk * to_end[:, None]), vv, input_precision=PREC)


@triton.jit
def _bwd_dkv(q, k, v, mask, resets, log_decay, d_final, do, dk, dv, d_s0, share, T, H, K, V,
             L,
             BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The chunks in reverse, holding G = ∂loss/∂(state at the chunk's end):
    dv_s = Σ_(l ≥ s) D[l, s] (k_s · q_l) do_l + γ^(P−p_s) k_s G,
    dk_s = m_s (Σ_(l ≥ s) D[l, s] (v_s · do_l) q_l + γ^(P−p_s) G v_s)  (a share per block),
    then G ← γ^P G + (γ^p ⊙ Q)ᵀ dO; at the start, G is ∂loss/∂S_0."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lam = tl.load(log_decay + h).to(tl.float32)
    rk, rv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    G = _state_block(d_final, bh, K, V, rk, rv)
    dk_block = dk + iv * share
    n_chunks = tl.cdiv(T, L)
    for j in range(0, n_chunks):
        t0 = (n_chunks - 1 - j) * L
        m, p, P = _positions(mask, b, t0, T, L, BL)
        d, D = _documents(resets, b, t0, T, L, BL)
        q_in, to_end, carry = _factors(p, P, d, D, lam)
        qq = _chunk(q, b, t0, h, T, H, K, L, rk, BL, BK)
        kk = _chunk(k, b, t0, h, T, H, K, L, rk, BL, BK) * m[:, None]
        vv = _chunk(v, b, t0, h, T, H, V, L, rv, BL, BV)
        dd = _chunk(do, b, t0, h, T, H, V, L, rv, BL, BV)
        d_t = _decay(p, d, lam, BL, False)  # [s, l]
        to_end = to_end[:, None]
        a = tl.dot(kk, tl.trans(qq), input_precision=PREC) * d_t
        g_v = tl.dot(a, dd, input_precision=PREC) + tl.dot(kk * to_end, G, input_precision=PREC)
        _store_chunk(dv, g_v, b, t0, h, T, H, V, L, rv, BL)
        a = tl.dot(vv, tl.trans(dd), input_precision=PREC) * d_t
        g_k = tl.dot(a, qq, input_precision=PREC)
        g_k += tl.dot(vv, tl.trans(G), input_precision=PREC) * to_end
        _store_chunk(dk_block, g_k * m[:, None], b, t0, h, T, H, K, L, rk, BL)
        G = G * carry + tl.dot(tl.trans(qq * q_in[:, None]), dd, input_precision=PREC)
    _store_state(d_s0, G, bh, K, V, rk, rv)


@triton.jit
def _step(q, k, v, mask, reset, log_decay, state, out, o, H, K, V,
          BK: tl.constexpr, BV: tl.constexpr):
    """S' = (1 − r) γ^m S + m kᵀv and o = q S' for one (row, head) and BV value columns;
    `out` may be `state` itself (each program reads its block before writing it)."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    m = tl.load(mask + b).to(tl.float32)
    lam = tl.load(log_decay + h).to(tl.float32)
    carry = tl.where(tl.load(reset + b) != 0, 0.0, tl.exp(lam * m))
    qq = tl.load(q + bh * K + rk, mask=rk < K, other=0.0).to(tl.float32)
    kk = tl.load(k + bh * K + rk, mask=rk < K, other=0.0).to(tl.float32) * m
    vv = tl.load(v + bh * V + rv, mask=rv < V, other=0.0).to(tl.float32)
    S = _state_block(state, bh, K, V, rk, rv) * carry + kk[:, None] * vv[None, :]
    _store_state(out, S, bh, K, V, rk, rv)
    tl.store(o + bh * V + rv, tl.sum(qq[:, None] * S, 0), mask=rv < V)


def _blocks(K: int, V: int, L: int) -> tuple[int, int, int]:
    """Block sizes: all of K, V in blocks of up to 64, the chunk; powers of two, at least 16
    (tl.dot's smallest)."""
    return (max(16, triton.next_power_of_2(L)), max(16, triton.next_power_of_2(K)),
            min(64, max(16, triton.next_power_of_2(V))))


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _inputs(q, k, v, log_decay, state, mask, resets=None):
    """Contiguous inputs (q, k, v keep their dtype: the kernels read bf16/fp16 and compute in
    float32), a float32 mask, resets and state (ones / zeros when not given)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = (q.new_zeros(B, H, K, V, dtype=torch.float32) if state is None
             else state.float().contiguous())
    mask = q.new_ones(B, T, dtype=torch.float32) if mask is None else mask.float().contiguous()
    resets = (q.new_zeros(B, T, dtype=torch.float32) if resets is None
              else resets.float().contiguous())
    return (q.contiguous(), k.contiguous(), v.contiguous(),
            log_decay.float().contiguous(), state, mask, resets)


def _forward(q, k, v, log_decay, state, mask, resets, L: int) -> tuple[Tensor, Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    BL, BK, BV = _blocks(K, V, L)
    o = q.new_empty(B, T, H, V, dtype=torch.float32)
    final = torch.empty_like(state)
    grid = (B * H, triton.cdiv(V, BV))
    _fwd[grid](q, k, v, mask, resets, log_decay, state, o, final, T, H, K, V, L,
               BL=BL, BK=BK, BV=BV, PREC=_precision())
    return o, final


def _backward(q, k, v, log_decay, state, mask, resets, final, do, d_final, L: int):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BL, BK, BV = _blocks(K, V, L)
    NV = triton.cdiv(V, BV)
    do, d_final = do.float().contiguous(), d_final.float().contiguous()
    dq = q.new_empty(NV, B, T, H, K, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = v.new_empty(B, T, H, V, dtype=torch.float32)
    d_state = torch.empty_like(state)
    grid, share = (B * H, NV), B * T * H * K
    _bwd_dq[grid](k, v, mask, resets, log_decay, state, do, dq, share, T, H, K, V, L,
                  BL=BL, BK=BK, BV=BV, PREC=_precision())
    _bwd_dkv[grid](q, k, v, mask, resets, log_decay, d_final, do, dk, dv, d_state, share, T, H,
                   K, V, L, BL=BL, BK=BK, BV=BV, PREC=_precision())
    dq, dk = dq.sum(0), dk.sum(0)
    # log γ enters every decay as γ^(p_n − p_m): with p the running count of real tokens,
    # ∂loss/∂log γ = Σ_n p_n (q_n·dq_n − k_n·dk_n) + p_T ⟨dS_T, S_T⟩ (substitute
    # q'_n = γ^(p_n) q_n, k'_m = γ^(−p_m) k_m, S_T = γ^(p_T) (S_0 + Σ k'_mᵀ v_m)); resets
    # only zero some terms (constant factors), so it holds with documents too.
    pos = mask.cumsum(1)  # [B, T]
    per_token = (q.float() * dq).sum(-1) - (k.float() * dk).sum(-1)  # [B, T, H]
    d_log = (pos[:, :, None] * per_token).sum((0, 1))
    d_log += (pos[:, -1, None] * (d_final * final).sum((-2, -1))).sum(0)
    return dq, dk, dv, d_log, d_state


class ChunkwiseRetention(torch.autograd.Function):
    """The chunkwise form with the kernels above in its forward and backward: gradients for
    q, k, v, log γ and the incoming state (not the mask)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, state, mask, resets, chunk_size: int):
        o, final = _forward(q, k, v, log_decay, state, mask, resets, chunk_size)
        ctx.save_for_backward(q, k, v, log_decay, state, mask, resets, final)
        ctx.chunk_size, ctx.dtypes = chunk_size, (q.dtype, k.dtype, v.dtype)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, log_decay, state, mask, resets, final = ctx.saved_tensors
        dq, dk, dv, d_log, d_state = _backward(q, k, v, log_decay, state, mask, resets, final,
                                               do, d_final, ctx.chunk_size)
        dq, dk, dv = (g.to(t) for g, t in zip((dq, dk, dv), ctx.dtypes))
        return dq, dk, dv, d_log, d_state, None, None, None


def chunkwise_retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                        state: Tensor | None = None, mask: Tensor | None = None,
                        chunk_size: int = 64, resets: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """`retnet.ops.retention_chunkwise` through the fused kernels: o [B, T, H, V] and the
    final state [B, H, K, V], float32."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    q, k, v, log_decay, state, mask, resets = _inputs(q, k, v, log_decay, state, mask, resets)
    return ChunkwiseRetention.apply(q, k, v, log_decay, state, mask, resets,
                                    min(chunk_size, q.shape[1]))


def retention_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                   mask: Tensor | None = None, reset: Tensor | None = None, *,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`retnet.ops.retention_step` as one kernel: q, k [B, H, K], v [B, H, V], state
    [B, H, K, V] float32, reset [B] bool; `out` (may be `state`: in place) receives S'.
    No autograd."""
    B, H, K = q.shape
    V = v.shape[-1]
    _, BK, BV = _blocks(K, V, 1)
    mask = q.new_ones(B, dtype=torch.float32) if mask is None else mask.float().contiguous()
    reset = q.new_zeros(B, dtype=torch.float32) if reset is None else reset.float().contiguous()
    state = state.contiguous()
    out = torch.empty_like(state) if out is None else out
    o = q.new_empty(B, H, V, dtype=torch.float32)
    _step[(B * H, triton.cdiv(V, BV))](q.contiguous(), k.contiguous(), v.contiguous(), mask,
                                       reset, log_decay.float().contiguous(), state, out, o,
                                       H, K, V, BK=BK, BV=BV)
    return o, out


def chunkwise_form(form, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                   state: Tensor | None, mask: Tensor | None, resets: Tensor | None = None,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`Form("chunkwise", backend="triton")` (shapes checked by the Form)."""
    return chunkwise_retention(q, k, v, log_decay, state, mask, chunk_size=form.chunk_size,
                               resets=resets)


def recurrent_form(form, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                   state: Tensor | None, mask: Tensor | None, resets: Tensor | None = None,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`Form("recurrent", backend="triton")`: one fused step kernel per token, the last one
    writing into `out` when given (no autograd)."""
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if state is None else state
    outputs = []
    for t in range(T):
        o, state = retention_step(q[:, t], k[:, t], v[:, t], log_decay, state.float(),
                                  None if mask is None else mask[:, t],
                                  None if resets is None else resets[:, t],
                                  out=out if t == T - 1 else None)
        outputs.append(o)
    return torch.stack(outputs, dim=1), state
