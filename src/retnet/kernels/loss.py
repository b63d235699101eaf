"""Cross-entropy over an LM head without the [tokens, vocab] logits: the fast path of
`retnet.ops.loss.linear_cross_entropy` (chosen by `retnet.kernels.dispatch`).

The plain loss, `cross_entropy(hidden @ Wᵀ, targets)`, keeps the whole [N, V] logits for the
backward pass and then makes a gradient of the same size: at N = 8192 tokens and V = 32000
that is 1 GiB each in float32, the largest tensors of a training step. Here the rows go
through in chunks; each chunk's logits live only while its loss and its gradients are made:

    logits_c = h_c Wᵀ                         [C, V], float32 (float64 for float64 inputs)
    loss    += Σ_rows (logsumexp(logits_c) − logits_c[target])          (real rows only)
    g_c      = softmax(logits_c) − onehot(target)                       (the loss's gradient)
    ∂h_c     = g_c W,   ∂W += g_cᵀ h_c

so the gradients are finished in the forward pass (one extra pass would otherwise recompute
the logits), kept as [N, D] and [V, D], and scaled by the incoming gradient in the backward.
The mean is over the targets that are not `ignore_index`, as `F.cross_entropy` takes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# logits of one chunk: 32 MiB (256 rows at V = 32000, float32). Each chunk is still a
# full-speed product (256 × D × V), and the chunk is a transient at the peak of a step: at 64
# MiB it was a tenth of a LoRA step's peak at the `small` preset (benchmarks/finetune.py).
CHUNK_BYTES = 32 << 20


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows_per_chunk(vocab: int, dtype: torch.dtype, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be ≥ 1; got {chunk_rows}")
        return chunk_rows
    return max(1, CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))


def _chunk_terms(h: Tensor, w: Tensor, t: Tensor, ignore_index: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For rows h [C, D] and targets t [C]: the summed loss, the logits' exp-normalised form
    (softmax, [C, V]), the clamped targets and the real-row mask."""
    logits = h @ w.t()  # [C, V]
    real = t != ignore_index
    target = torch.where(real, t, 0)
    picked = logits.gather(1, target[:, None]).squeeze(1)  # [C]
    # logsumexp and softmax in the logits' own memory: torch.logsumexp would make a [C, V]
    # temporary (a fresh 32 MiB block, and one more pass over it, per chunk)
    top = logits.amax(-1, keepdim=True)  # [C, 1]
    probs = logits.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)  # [C, 1]
    probs.div_(total)  # softmax
    lse = (top + total.log()).squeeze(1)  # [C]
    loss = ((lse - picked) * real).sum()
    return loss, probs, target, real


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                rows: int) -> Tensor:
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        # A frozen head (LoRA fine-tuning) gets no gradient: neither the [V, D] buffer nor
        # the [V, C] × [C, D] product per chunk
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)
            loss, g, target, real = _chunk_terms(h, w, targets[start:start + rows], ignore_index)
            total += loss
            g[torch.arange(g.shape[0], device=g.device), target] -= 1  # softmax − onehot
            g *= real[:, None]
            torch.mm(g, w, out=grad_h[start:start + rows])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(grad_h, grad_w, count)  # None is saved as None
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        grad_weight = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[1])
        return (grad_h * scale).to(ctx.dtypes[0]), grad_weight, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                          ignore_index: int = -100, chunk_rows: int | None = None) -> Tensor:
    """mean cross-entropy of (hidden @ weightᵀ) against targets, never holding the full logits.

    hidden [..., D] (any dtype; computed in float32, float64 for float64 inputs);
    weight [V, D]; targets [...] of the same leading shape, `ignore_index` for no target.
    chunk_rows: rows per chunk (default: logits of about 32 MiB). Autocast does not apply:
    the products run in the compute dtype, so the loss is that of the plain float32 head."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but targets {t.shape[0]}")
    rows = _rows_per_chunk(weight.shape[0], _compute_dtype(hidden, weight), chunk_rows)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, t, ignore_index, rows)
        return _loss_only(h, weight, t, ignore_index, rows)


def _loss_only(h: Tensor, weight: Tensor, t: Tensor, ignore_index: int, rows: int) -> Tensor:
    """The same mean loss without gradients (evaluation)."""
    dtype = _compute_dtype(h, weight)
    w = weight.to(dtype)
    total = torch.zeros((), dtype=dtype, device=h.device)
    for start in range(0, h.shape[0], rows):
        total += _chunk_terms(h[start:start + rows].to(dtype), w, t[start:start + rows],
                              ignore_index)[0]
    return total / (t != ignore_index).sum()
