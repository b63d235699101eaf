"""Fast paths beside the plain PyTorch reference, behind one switch:

    retnet.kernels.set_enabled(False)   # or RETNET_KERNELS=0 in the environment

The PyTorch forms in `retnet.ops` (and the model's own forward) stay the reference. Which code
a call runs is decided in one table, `retnet.kernels.dispatch` (see docs/architecture.md, "From
a call to a kernel"): a fast path runs only where it is enabled and its conditions hold (built
here, the right device and dtype), and otherwise the reference runs, after a one-line notice on
stderr where the reason is worth telling (once per reason). The fast paths, one module each:

- `decode`: a whole one-token step of the model in one C++ call (`torch.ops.retnet`, compiled
  from `cpu/` by `build`), CPU, float32 / bf16 / int8 weights;
- `head_norm`: a retention layer's output stage (division by the score sum, GroupNorm, gate,
  W_O) as one C++ pass forward and backward, CPU float32;
- `gemv`: one-row float32 products split across cores, and the C++ weight-streaming product;
- `chunkwise`: the chunkwise form as one autograd Function that recomputes its chunk states
  and scores in the backward instead of keeping them (any device, not float64);
- `norm_linear`, `activation`, `gate`, `loss`: autograd Functions that keep less for the
  backward (a norm's output, an activation, a gate's product, an LM head's logits);
- `triton_retention`: the Triton retention kernels, opt-in with `Form(backend="triton")`, on
  CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from retnet.kernels.dispatch import choose
from retnet.kernels.switch import ENV, cpu_kernels, enabled, notice, set_enabled

__all__ = ["ENV", "cpu_kernels", "enabled", "linear", "notice", "set_enabled", "triton_path"]


def triton_path(x: Tensor) -> bool:
    """Whether `Form(backend="triton")` runs the Triton kernels on tensors like x (else a
    notice says why not, once)."""
    return choose("retention.chunkwise", SimpleNamespace(backend="triton"), x, x, x, x) is not None


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """x [M, K] float32 @ (weight [N, K] · scale[:, None])ᵀ → [M, N] float32, streaming the
    weight once: weight float32, bfloat16, or int8 with per-row scales [N] float32. The
    compiled kernel where the table chooses it, else the same product in PyTorch."""
    scale = torch.empty(0) if scale is None else scale
    fast = choose("streamed_linear", x, weight, scale)
    if fast is not None:
        return fast(x, weight, scale)
    y = x @ weight.to(x.dtype).t()
    return y * scale if scale.numel() else y
