"""Retention, RetNet's sequence mixer, in three equivalent forms with one signature.

Every form computes, for each batch row and head, the masked decayed recurrence

    S_n = γ^(m_n) S_(n-1) + m_n k_nᵀ v_n          o_n = q_n S_n

where m_n ∈ {0, 1} is the mask (1 = real token). A masked position neither decays the state
nor writes to it, so padding is invisible to the real tokens. A reset r_n = 1 (a document
starts at n) discards the state entering n: S_n = (1 − r_n) γ^(m_n) S_(n−1) + m_n k_nᵀ v_n.
Unrolled, with p_n the number of real tokens up to and including n and d_n the number of
resets up to and including n (the token's document):

    o_n = Σ_(m ≤ n, d_m = d_n) γ^(p_n − p_m) (q_n · m_m k_m) v_m  +  [d_n = 0] γ^(p_n) q_n S_0

so a packed row computes exactly what each of its documents computes alone.

The exponents p_n − p_m are exact integers, so every decay is γ raised to an exact count,
computed as exp(count · log γ) with the causal mask applied before exp: no positive
exponent is ever exponentiated, whatever the length.

Layout: q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; state [B, H, K, V]; mask [B, T];
resets [B, T] (bool; `retnet.ops.documents` converts cumulative sequence lengths).
All forms compute in float32 (float64 when q is float64) with autocast disabled, and return
the output in that dtype: callers decide when to round to a lower precision.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.ops.documents import document_ids

Mode = Literal["parallel", "recurrent", "chunkwise"]
MODES: tuple[str, ...] = ("parallel", "recurrent", "chunkwise")
# "auto": the dispatch table's choice (the chunkwise autograd Function where the switch allows,
# else these forms); "triton": the opt-in Triton kernels where they may run
Backend = Literal["auto", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "triton")
DEFAULT_CHUNK_SIZE = 64  # tokens per chunk unless a caller says otherwise (the one default)


class RetentionForm(Protocol):
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_decay: Tensor,
        state: Tensor | None = None,
        mask: Tensor | None = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                  state: Tensor | None, mask: Tensor | None, resets: Tensor | None = None
                  ) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got {tuple(v.shape)}")
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay must be [H] = [{H}]; got {tuple(log_decay.shape)}")
    if state is not None and state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}]; got {tuple(state.shape)}"
        )
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = [{B}, {T}]; got {tuple(mask.shape)}")
    if resets is not None and (resets.shape != (B, T) or resets.dtype != torch.bool):
        raise ValueError(f"resets must be bool [B, T] = [{B}, {T}] (True: a document starts "
                         f"there); got {resets.dtype} {tuple(resets.shape)}")


def _prepare(q, k, v, log_decay, state, mask, resets=None):
    """Validate, upcast to the compute dtype, and fill in the defaults (zero state, no mask)."""
    _check_shapes(q, k, v, log_decay, state, mask, resets)
    dtype = compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_decay = log_decay.to(device=q.device, dtype=dtype)
    if state is None:
        state = q.new_zeros(B, H, K, V)
    state = state.to(dtype)
    if mask is None:
        mask = q.new_ones(B, T)
    mask = mask.to(dtype)
    # A masked key writes nothing to the state.
    k = k * mask[:, :, None, None]
    return q, k, v, log_decay, state, mask


def _causal_decay(pos: Tensor, log_decay: Tensor, docs: Tensor | None = None) -> Tensor:
    """D[..., h, n, m] = γ_h^(pos_n − pos_m) for n ≥ m in the same document, else 0.

    pos [..., T] counts real tokens (integer-valued floats); docs [..., T] document ids or
    None (one document); returns [..., H, T, T].
    """
    T = pos.shape[-1]
    dist = pos[..., :, None] - pos[..., None, :]  # [..., T, T]
    log_d = dist.unsqueeze(-3) * log_decay[:, None, None]  # [..., H, T, T]
    keep = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    if docs is not None:
        keep = keep & (docs[..., :, None] == docs[..., None, :]).unsqueeze(-3)  # [..., 1, T, T]
    # Mask in log space before exp: above the diagonal the exponent would be positive.
    return torch.where(keep, log_d, float("-inf")).exp()


def _powers(count: Tensor, log_decay: Tensor, keep: Tensor | None = None) -> Tensor:
    """γ_h^count for count [...] (integer-valued floats), 0 where `keep` [...] is False (a
    reset lies between); returns [..., H]."""
    log_p = count.unsqueeze(-1) * log_decay
    return (log_p if keep is None else torch.where(keep.unsqueeze(-1), log_p, -math.inf)).exp()


def _documents(resets: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """From resets [..., T]: each token's document id d [..., T], whether it is in the first
    document (reads the incoming state: d = 0) and whether it is in the last (writes the
    final state: d = d_last); all None without resets."""
    if resets is None:
        return None, None, None
    docs = document_ids(resets)
    return docs, docs == 0, docs == docs[..., -1:]


def retention_parallel(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                       state: Tensor | None = None, mask: Tensor | None = None,
                       resets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Parallel form: (Q Kᵀ ⊙ D) V plus the decayed incoming state. O(T²) time and memory.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. log_decay: [H], log γ per head (≤ 0).
        state: optional incoming [B, H, K, V]. mask: optional [B, T], 1 = real token.
        resets: optional bool [B, T], True where a document starts (the state entering that
        token is discarded: the rest of the row runs as if it began there).
    Returns:
        o [B, T, H, V] and the final state [B, H, K, V], in the compute dtype.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, log_decay, state, mask = _prepare(q, k, v, log_decay, state, mask, resets)
        pos = mask.cumsum(1)  # [B, T]
        docs, first, last = _documents(resets)  # [B, T] each, or None
        # 1. within the sequence: scores decayed by γ^(p_n − p_m), within each document
        scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * _causal_decay(pos, log_decay, docs)
        o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
        # 2. the incoming state, decayed by γ^(p_n), read by the first document only
        q_in = q * _powers(pos, log_decay, first)[..., None]
        o = o + torch.einsum("bnhk,bhkv->bnhv", q_in, state)
        # 3. the final state: the last document's keys decayed to the end, plus the decayed
        # incoming state if no reset came after it
        total = pos[:, -1:]  # [B, 1]
        k_end = k * _powers(total - pos, log_decay, last)[..., None]
        kept = None if first is None else first[:, -1]  # [B]
        final = _powers(total[:, 0], log_decay, kept)[..., None, None] * state
        final = final + torch.einsum("bmhk,bmhv->bhkv", k_end, v)
    return o, final


def retention_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                   mask: Tensor | None = None, reset: Tensor | None = None, *,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, the body of the recurrent form:

        S' = (1 − r) γ^m S + m kᵀv,   o = q S'   (m = 1 for a real token, 0 for padding;
                                                  r = 1 where a document starts)

    q, k [B, H, K]; v [B, H, V]; state [B, H, K, V]; mask [B]; reset [B] bool; log_decay
    [H]; all in the compute dtype. `out` [B, H, K, V] (contiguous, not aliasing `state`)
    receives S', so a decode loop can alternate two buffers instead of allocating a state
    per token.
    Returns o [B, H, V] and S'.
    """
    B, H, K = q.shape
    V = v.shape[-1]
    if mask is None:
        decay = log_decay.exp()[:, None, None]  # [H, 1, 1]
    else:
        decay = (mask[:, None] * log_decay).exp()[..., None, None]  # [B, H, 1, 1]: γ or 1
        k = k * mask[:, None, None]
    if reset is not None:  # a new document: the state entering it is dropped (γ^m · 0)
        decay = torch.where(reset[:, None, None, None], 0.0, decay)  # [B, H, 1, 1]
    new = torch.mul(state.contiguous(), decay, out=out)  # pass 1 over the state
    # pass 2: add kᵀv in place, one [K, 1] @ [1, V] per (row, head), no [B, H, K, V] temporary
    new.view(B * H, K, V).baddbmm_(k.reshape(B * H, K, 1), v.reshape(B * H, 1, V))
    o = torch.bmm(q.reshape(B * H, 1, K), new.view(B * H, K, V))  # pass 3: read only
    return o.view(B, H, V), new


def retention_recurrent(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                        state: Tensor | None = None, mask: Tensor | None = None,
                        resets: Tensor | None = None, *,
                        out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Recurrent form: one step per token, O(1) memory in T. Same arguments as the parallel
    form, plus `out`: an optional buffer for the final state (see `retention_step`)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, log_decay, state, mask = _prepare(q, k, v, log_decay, state, mask, resets)
        T = q.shape[1]
        outputs = []
        for t in range(T):
            o, state = retention_step(q[:, t], k[:, t], v[:, t], log_decay, state, mask[:, t],
                                      None if resets is None else resets[:, t],
                                      out=out if t == T - 1 else None)
            outputs.append(o)
        o = torch.stack(outputs, dim=1)
    return o, state


def retention_chunkwise(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                        state: Tensor | None = None, mask: Tensor | None = None,
                        resets: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
                        ) -> tuple[Tensor, Tensor]:
    """Chunkwise form: parallel within chunks of L tokens, recurrent across them. O(T·L) memory.

    Derived from the recurrence (not from the paper's eq. 7, which has known errors). A tail
    shorter than L is padded with masked positions, which by definition change nothing.
    Same arguments as the parallel form, plus chunk_size (any positive int).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, log_decay, state, mask = _prepare(q, k, v, log_decay, state, mask, resets)
        B, T, H, K = q.shape
        V = v.shape[-1]
        L = min(chunk_size, T)
        N = math.ceil(T / L)
        if N * L != T:
            pad = N * L - T
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            mask = torch.nn.functional.pad(mask, (0, pad))
            resets = None if resets is None else torch.nn.functional.pad(resets, (0, pad))
        q, k = q.view(B, N, L, H, K), k.view(B, N, L, H, K)
        v = v.view(B, N, L, H, V)
        pos = mask.view(B, N, L).cumsum(-1)  # [B, N, L] real tokens so far within the chunk
        total = pos[..., -1:]  # [B, N, 1] real tokens in the chunk
        # documents counted from each chunk's start: d = 0 continues the incoming state
        docs, first, last = _documents(None if resets is None else resets.view(B, N, L))

        # 1. intra-chunk: the parallel form inside each chunk (and each document)
        scores = torch.einsum("bnlhk,bnshk->bnhls", q, k) * _causal_decay(pos, log_decay, docs)
        o = torch.einsum("bnhls,bnshv->bnlhv", scores, v)
        # 2. each chunk's own write to the state at its end: Σ_s γ^(total − p_s) k_sᵀ v_s over
        # the chunk's last document
        k_end = k * _powers(total - pos, log_decay, last)[..., None]
        chunk_kv = torch.einsum("bnlhk,bnlhv->bnhkv", k_end, v)  # [B, N, H, K, V]
        # 3. pass the state across chunks: S_(j+1) = γ^(total_j) S_j + chunk_kv_j, S_j dropped
        # where a reset lies in chunk j
        kept = None if first is None else first[..., -1]  # [B, N]
        chunk_decay = _powers(total[..., 0], log_decay, kept)[..., None, None]  # [B, N, H, 1, 1]
        incoming = []
        # unbind, not chunk_kv[:, j]: the backward of N selects would allocate and zero N
        # full-size [B, N, H, K, V] gradients; unbind's backward stacks them once.
        for kv_j, decay_j in zip(chunk_kv.unbind(1), chunk_decay.unbind(1)):
            incoming.append(state)
            state = torch.addcmul(kv_j, decay_j, state)
        incoming = torch.stack(incoming, dim=1)  # [B, N, H, K, V] state entering each chunk
        # 4. the incoming state's contribution: γ^(p_l) q_l S_j, for the chunk's first document
        q_in = q * _powers(pos, log_decay, first)[..., None]
        o = o + torch.einsum("bnlhk,bnhkv->bnlhv", q_in, incoming)
        o = o.reshape(B, N * L, H, V)
        if N * L != T:  # a slice's backward zero-fills a full-size gradient: only when needed
            o = o[:, :T]
    return o, state


@dataclass(frozen=True)
class Form:
    """Which of the three equivalent forms computes retention, chosen once and passed down as
    one value (instead of a (mode, chunk_size) pair through every layer). Callable with the
    forms' one signature:

        form = Form("chunkwise", chunk_size=128)
        o, state = form(q, k, v, log_decay, state, mask, resets)
    """

    mode: Mode = "parallel"
    chunk_size: int = DEFAULT_CHUNK_SIZE  # used by "chunkwise" only
    # "auto": whatever `retnet.kernels.dispatch` chooses; "triton": the fused GPU kernels
    # (chunkwise or recurrent; opt-in) where they may run, else this PyTorch form after a notice
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.backend == "torch":  # its old name, which read as "the PyTorch reference"
            warnings.warn("Form(backend='torch') is now Form(backend='auto') (the dispatch "
                          "table's choice); 'torch' will be removed", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "backend", "auto")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.backend == "triton" and self.mode == "parallel":
            raise ValueError("backend='triton' has chunkwise and recurrent kernels; the "
                             "parallel form is PyTorch only")
        if (not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool)
                or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer; got {self.chunk_size!r}")

    @classmethod
    def of(cls, mode: Mode | Form = "parallel", chunk_size: int | None = None) -> Form:
        """A Form from a mode name (and chunk size), or the Form itself (chunk_size None)."""
        if isinstance(mode, Form):
            if chunk_size is not None:
                raise ValueError("pass chunk_size inside the Form, not beside it")
            return mode
        return cls(mode, DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                 state: Tensor | None = None, mask: Tensor | None = None,
                 resets: Tensor | None = None, *,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """out: buffers that receive the new state (recurrent form only)."""
        if out is not None and self.mode != "recurrent":
            raise ValueError("out= (a state buffer to write into) needs mode='recurrent'")
        _check_shapes(q, k, v, log_decay, state, mask, resets)
        args = (self, q, k, v, log_decay, state, mask, resets, out)
        fast = choose(f"retention.{self.mode}", *args)
        if fast is not None:
            return fast(*args)
        if self.mode == "chunkwise":
            return retention_chunkwise(q, k, v, log_decay, state, mask, resets,
                                       chunk_size=self.chunk_size)
        if self.mode == "recurrent":
            return retention_recurrent(q, k, v, log_decay, state, mask, resets, out=out)
        return retention_parallel(q, k, v, log_decay, state, mask, resets)


PARALLEL, RECURRENT, CHUNKWISE = Form("parallel"), Form("recurrent"), Form("chunkwise")


def retention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
              state: Tensor | None = None, mask: Tensor | None = None,
              resets: Tensor | None = None, *,
              mode: Mode | Form = "parallel", chunk_size: int | None = None
              ) -> tuple[Tensor, Tensor]:
    """Retention in the form named by `mode`; see `retention_parallel` for the arguments."""
    return Form.of(mode, chunk_size)(q, k, v, log_decay, state, mask, resets)
