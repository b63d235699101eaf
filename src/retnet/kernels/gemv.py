"""Matrix-vector products that use every core on a CPU: the fast paths of `retnet.ops.linear`
and `retnet.kernels.linear` (chosen by `retnet.kernels.dispatch`).

A one-token decode step multiplies one vector by every weight: it is bound by how fast the
weights stream from memory. MKL runs a float32 matrix-vector product on one core, which on
the 2-core benchmark machine streams ~11 GB/s from the default [out, in] layout, against
29-36 GB/s for a two-core copy (`python benchmarks/gemv.py`, output in
benchmarks/results/gemv.txt). Splitting the product into independent parts and handing them
to one batched matmul puts each part on its own core (`split_linear`):

    default layout, W [out, in] contiguous: split the output rows (~18 GB/s)
    decode layout,  W stored as Wᵀ [in, out] (see `retnet.modules.layout`): split the reduction
                    dimension and add the partial sums (~25 GB/s; the LM head ~40 GB/s)

The result equals F.linear up to the order of the float additions. `streamed_linear` is the
C++ product (`kernels/cpu/products.h`) that streams float32, bf16 or int8 rows once.
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


def split_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] (one row, float32, CPU) @ weightᵀ with weight [out, in] in either layout;
    returns [..., out]. F.linear where the dimension to split does not divide."""
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


def streamed_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] float32 @ (weight [N, K] · scale[:, None])ᵀ → [M, N] float32 through
    `torch.ops.retnet.linear` (scale empty: none)."""
    return torch.ops.retnet.linear(x.contiguous(), weight.contiguous(), scale)
