"""Fake (meta) implementations of the compiled ops, as pytorch/extension-cpp registers them: what
each op returns given only shapes and dtypes, so torch.compile, export and FakeTensor tracing
can see through `torch.ops.retnet.*` without running them. Registered once, right after the
library is loaded (`retnet.kernels.build.load`); `tests/kernels/test_kernels_opcheck.py` checks each
against the real kernel with `torch.library.opcheck`."""

from __future__ import annotations

import torch
from torch import Tensor


def _linear(x: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    torch._check(x.dim() == 2 and w.dim() == 2 and w.shape[1] == x.shape[1])
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


def _decode_step(ids, mask, offset, offset_out, embed, embed_scale, weights, scales, vectors,
                 kv_in, kv_out, log_decay, inv_freq, ints, floats, sources, stamp) -> Tensor:
    # [B, vocab]: the head's rows (the real op returns [0] instead, having done nothing, when
    # its plan is stale; a traced call is never stale)
    return ids.new_empty(ids.shape[0], weights[-1].shape[0], dtype=torch.float32)


def _head_norm_gate(of: Tensor, c: Tensor, g: Tensor, w: Tensor, b: Tensor,
                    eps: float) -> Tensor:
    return torch.empty_like(g)


def _head_norm_gate_backward(dout: Tensor, of: Tensor, c: Tensor, g: Tensor, w: Tensor,
                             b: Tensor, eps: float) -> list[Tensor]:
    return [torch.empty_like(of), torch.empty_like(g), torch.empty_like(w), torch.empty_like(b)]


# (`stamp` and `isa` have none: they are registered for every device at once, read no tensor
# data that a fake could stand for, and are never traced.)
FAKES = {"retnet::linear": _linear, "retnet::decode_step": _decode_step,
         "retnet::head_norm_gate": _head_norm_gate,
         "retnet::head_norm_gate_backward": _head_norm_gate_backward}
_registered = False


def register() -> None:
    """Register every fake once per process (after torch.ops.load_library)."""
    global _registered
    if not _registered:
        for name, fn in FAKES.items():
            torch.library.register_fake(name)(fn)
        _registered = True
