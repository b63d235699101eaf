"""x Wᵀ for the projections, with a matrix-vector path that uses every core on a CPU.

A one-token decode step multiplies one vector by every weight: it is bound by how fast the
weights stream from memory. MKL runs a float32 matrix-vector product on one core, which on
the 2-core benchmark machine streams ~11 GB/s from the default [out, in] layout, against
29-36 GB/s for a two-core copy (`python benchmarks/gemv.py`, output in
benchmarks/results/gemv.txt). Splitting the product into independent parts and handing them
to one batched matmul puts each part on its own core:

    default layout, W [out, in] contiguous: split the output rows (~18 GB/s)
    decode layout,  W stored as Wᵀ [in, out] (see `retnet.modules.layout`): split the reduction
                    dimension and add the partial sums (~25 GB/s; the LM head ~40 GB/s)

The split path runs only for one row in float32 on a CPU; everything else (batches, training,
bf16, CUDA) is plain F.linear, whose kernels already do well there. The result equals F.linear
up to the order of the float additions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _splits(n: int) -> int:
    """How many independent parts to cut a dimension of size n into: one per thread, ≤ 8."""
    parts = min(torch.get_num_threads(), 8)
    while parts > 1 and n % parts:
        parts -= 1
    return parts


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weightᵀ with weight [out, in] (any memory layout); returns [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows != 1 or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dim() != 2:
        return F.linear(x, weight)
    out_dim, in_dim = weight.shape
    flat = x.reshape(1, in_dim)
    if weight.stride() == (1, out_dim):  # decode layout: Wᵀ is contiguous [in, out]
        parts = _splits(in_dim)
        if parts > 1:
            # [parts, 1, in/parts] @ [parts, in/parts, out] → partial sums [parts, 1, out]
            halves = torch.bmm(flat.view(parts, 1, in_dim // parts),
                               weight.t().view(parts, in_dim // parts, out_dim))
            return halves.sum(0).view(*x.shape[:-1], out_dim)
    elif weight.is_contiguous():
        parts = _splits(out_dim)
        if parts > 1:
            # [parts, 1, in] @ [parts, in, out/parts]: each part owns a block of output rows
            blocks = torch.bmm(flat.expand(parts, 1, in_dim),
                               weight.view(parts, out_dim // parts, in_dim).transpose(1, 2))
            return blocks.view(*x.shape[:-1], out_dim)
    return F.linear(x, weight)
