"""From a call to its kernel: for each operation, the PyTorch reference and the fast paths tried
before it, in order, each with what it needs. The one place that decides which code runs.

The place of use asks the table in one call and runs the reference itself when it answers None:

    args = (o_full, floor, g, weight, bias, eps, out_weight)
    fast = choose("head_norm_gate", *args)  # the first fast path whose needs hold, or None
    if fast is not None:
        return fast(*args)
    ...  # the reference

`explain` says in words what a call would run and why (`retnet info --kernels` prints it for
this machine). Fast paths are named "module:function" under `retnet.kernels` and looked up at
each call, so importing the table loads no kernel and a test can wrap any of them. Every
condition is checked here, before the call; only the fused decode step may still decline at
call time (None, where its weights are not [out, in] rows or its state buffers do not fit:
the caller then runs the reference). One switch, `retnet.kernels.set_enabled(False)` or
`RETNET_KERNELS=0`, is a need of every fast path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from retnet.kernels import switch


class Call(NamedTuple):
    """What the conditions look at, read off a call's arguments by its row's `facts`."""

    device: str  # where the tensors are: "cpu", "cuda", ...
    dtype: torch.dtype | None  # their common dtype; None when they differ
    grad: bool = False  # autograd records the call
    rows: int = 0  # rows of a product: 1 is a matrix-vector product
    backend: str = "auto"  # retention: the Form's backend
    dropout: bool = False  # a model whose dropout is active (training mode)
    autocast: bool = False  # autocast is on for the device
    adapters: bool = False  # a model holding unmerged LoRA adapters (native or PEFT)


@dataclass(frozen=True)
class Need:
    """One condition of a fast path: in words, as a test of the call, and the reason it fails."""

    says: str
    holds: Callable[[Call], bool]
    why_not: str | Callable[[Call], str]
    notice: bool = False  # say once on stderr when it stops a path (`loud`)
    selects: bool = False  # the caller picks this path by name (Form's backend)

    def reason(self, call: Call) -> str:
        return self.why_not if isinstance(self.why_not, str) else self.why_not(call)


def loud(need: Need) -> Need:
    """The same need, saying once on stderr when it sends a call to the reference."""
    return Need(need.says, need.holds, need.why_not, True, need.selects)


@dataclass(frozen=True)
class Fast:
    """A fast path: its name in words, its code ("module:function" under retnet.kernels), and
    its needs, checked in order."""

    name: str
    impl: str
    needs: tuple[Need, ...]

    def function(self) -> Callable:
        """The code, looked up in its module at each call (a test may wrap it there)."""
        module, name = self.impl.split(":")
        full = f"retnet.kernels.{module}"
        return getattr(sys.modules.get(full) or importlib.import_module(full), name)


@dataclass(frozen=True)
class Row:
    """An operation: where its reference runs ("module:qualname"), its fast paths in the order
    they are tried, and how a call's arguments become the `Call` the needs test."""

    reference: str
    fast: tuple[Fast, ...]
    facts: Callable[..., Call]


def _name(dtype: torch.dtype | None) -> str:
    return "mixed-dtype" if dtype is None else str(dtype).removeprefix("torch.")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What fast paths need. The switch comes first in every path that does not select itself by
# name (then right after); a `loud` need tells stderr once when it sends a call to the reference.
SWITCH = Need("fast paths on", lambda c: switch.enabled(),
              lambda c: f"fast paths off: {switch.why_off()}")
CPU = Need("CPU tensors", lambda c: c.device == "cpu",
           lambda c: f"{c.device} tensors: a CPU path")
CPU_KERNELS = Need("the C++ kernels built here", lambda c: switch.cpu_kernels(),
                   "the CPU kernels are unavailable here")
FLOAT32 = Need("float32", lambda c: c.dtype == torch.float32,
               lambda c: f"{_name(c.dtype)} tensors: it takes float32")
NOT_FLOAT64 = Need("not float64", lambda c: c.dtype != torch.float64,
                   "float64 tensors: it can only compute in float32")
ONE_DTYPE = Need("one dtype", lambda c: c.dtype is not None, "tensors of different dtypes")
DECODE_WEIGHTS = Need("float32, bfloat16 or int8 weights",
                      lambda c: c.dtype in (torch.float32, torch.bfloat16, torch.int8),
                      lambda c: f"{_name(c.dtype)} weights have no fused kernel")
GRAD = Need("under autograd", lambda c: c.grad, "no autograd: nothing to keep for a backward")
NO_GRAD = Need("no autograd", lambda c: not c.grad, "under autograd: it has no backward")
NO_DROPOUT = Need("no active dropout", lambda c: not c.dropout, "dropout is active")
NO_AUTOCAST = Need("no autocast", lambda c: not c.autocast, "autocast is on")
# The fused step streams each projection's base weight; an unmerged adapter adds (α/r)·B·A
# beside it, which only the reference reads (merge it for the fused step: retnet.merge_lora).
NO_ADAPTERS = Need("no unmerged LoRA adapters", lambda c: not c.adapters,
                   "the model holds unmerged LoRA adapters")
ONE_ROW = Need("one row", lambda c: c.rows == 1, lambda c: f"{c.rows} rows, not one")
AUTO = Need("Form(backend='auto')", lambda c: c.backend == "auto",
            lambda c: f"Form(backend={c.backend!r})", selects=True)
TRITON = Need("Form(backend='triton')", lambda c: c.backend == "triton",
              "opt-in: Form(backend='triton')", selects=True)
TRITON_DEVICE = Need("CUDA tensors (CPU under TRITON_INTERPRET=1)",
                     lambda c: c.device == "cuda" or (c.device == "cpu" and _interpreted()),
                     lambda c: f"they need CUDA tensors, not {c.device} (TRITON_INTERPRET=1 "
                               "runs them on the CPU, slowly)")
TRITON_INSTALLED = Need("triton installed",
                        lambda c: importlib.util.find_spec("triton") is not None,
                        "triton is not installed (pip install 'retnet-exact[triton]')")
TRITON_NEEDS = (TRITON, SWITCH, loud(TRITON_DEVICE), loud(NOT_FLOAT64), loud(TRITON_INSTALLED))


def _tensors(*tensors: Tensor) -> Call:
    """The device of the first tensor, their common dtype, autograd and autocast."""
    first = tensors[0]
    dtype = first.dtype if all(t.dtype == first.dtype for t in tensors) else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return Call(first.device.type, dtype, grad,
                autocast=torch.is_autocast_enabled(first.device.type))


def _retention(form, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
               state: Tensor | None = None, *_) -> Call:
    leaves = (q, k, v, log_decay) + (() if state is None else (state,))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    return Call(q.device.type, q.dtype, grad, backend=form.backend)


def _decode(model, token: Tensor, *_, backend: str = "auto") -> Call:
    weight = model.embed.weight
    device = weight.device.type if token.device == weight.device else "mixed-device"
    return Call(device, weight.dtype, torch.is_grad_enabled(), backend=backend,
                dropout=model.training and model.config.dropout > 0,
                adapters=bool(model.__dict__.get(ADAPTERS)))


# Set on a model by `retnet.modules.lora.add_lora`, removed by `merge_lora`: a flag, since
# walking the modules would cost ~150 µs a token at `small`. PEFT's layers, which set no
# flag, make the fused step decline when it gathers its weights (`kernels.decode`).
ADAPTERS = "_unmerged_lora"


def _head_norm(o_full, floor, g, weight, bias, eps, out_weight=None, low=None) -> Call:
    extra = (() if out_weight is None else (out_weight,)) + (() if low is None else low[:2])
    return _tensors(o_full, floor, g, weight, bias, *extra)


def _linear(x: Tensor, weight: Tensor, *_) -> Call:
    rows = x.numel() // x.shape[-1] if x.shape[-1] and weight.dim() == 2 else 0
    return Call(x.device.type, x.dtype if weight.dtype == x.dtype else None, rows=rows)


# op: Row(where the reference runs, (fast paths in the order tried), the call's facts)
TABLE: dict[str, Row] = {
    "retention.parallel": Row("retnet.ops.retention:retention_parallel", (), _retention),
    "retention.chunkwise": Row("retnet.ops.retention:retention_chunkwise", (
        Fast("Triton kernels", "triton_retention:chunkwise_form", TRITON_NEEDS),
        Fast("chunkwise autograd Function", "chunkwise:chunkwise_form",
             (AUTO, SWITCH, loud(NOT_FLOAT64))),
    ), _retention),
    "retention.recurrent": Row("retnet.ops.retention:retention_recurrent", (
        Fast("Triton kernels", "triton_retention:recurrent_form", TRITON_NEEDS + (loud(NO_GRAD),)),
    ), _retention),
    "decode_step": Row("retnet.model.lm:RetNetLM.forward", (
        Fast("fused CPU kernel", "decode:fused_decode",
             (AUTO, SWITCH, CPU, DECODE_WEIGHTS, NO_GRAD, NO_DROPOUT, NO_ADAPTERS,
              CPU_KERNELS)),
    ), _decode),
    "head_norm_gate": Row("retnet.modules.retention:MultiScaleRetention.forward", (
        Fast("fused CPU kernel", "head_norm:head_norm_gate",
             (SWITCH, CPU, CPU_KERNELS, loud(FLOAT32))),
    ), _head_norm),
    "linear": Row("retnet.ops.linear:linear", (
        Fast("split GEMV across cores", "gemv:split_linear", (SWITCH, CPU, FLOAT32, ONE_ROW)),
    ), _linear),
    "streamed_linear": Row("retnet.kernels:linear", (
        Fast("C++ weight-streaming product", "gemv:streamed_linear", (SWITCH, CPU, CPU_KERNELS)),
    ), lambda x, *_: Call(x.device.type, x.dtype)),
    "layer_norm_linear": Row("retnet.ops.norm_linear:layer_norm_linear", (
        Fast("recomputing autograd Function", "norm_linear:layer_norm_linear",
             (SWITCH, GRAD, ONE_DTYPE, NO_AUTOCAST)),
    ), _tensors),
    "act_linear": Row("retnet.ops.activation:act_linear", (
        Fast("recomputing autograd Function", "activation:act_linear", (SWITCH, GRAD, ONE_DTYPE)),
    ), _tensors),
    "silu_gate": Row("retnet.ops.gate:silu_gate", (
        Fast("recomputing autograd Function", "gate:silu_gate", (SWITCH, GRAD)),
    ), _tensors),
    "linear_cross_entropy": Row("retnet.ops.loss:linear_cross_entropy", (
        Fast("chunked cross-entropy", "loss:chunked_cross_entropy", (SWITCH,)),
    ), _tensors),
}


def choose(op: str, *args, **kwargs) -> Callable | None:
    """The function of the first fast path of `op` whose needs hold for these arguments (the
    call's arguments, or those its row's `facts` read), or None: run the reference."""
    row = TABLE[op]
    if not row.fast:
        return None
    call = row.facts(*args, **kwargs)
    for fast in row.fast:
        if _holds(op, fast, call, say=True):
            return fast.function()
    return None


def first(op: str, call: Call) -> Fast | None:
    """The fast path `op` takes for a call with these facts, or None (the reference); quiet."""
    return next((fast for fast in TABLE[op].fast if _holds(op, fast, call, say=False)), None)


def explain(op: str, call: Call) -> str:
    """In words, what `op` runs for a call with these facts and why: the fast path's name (with
    the vector ISA of compiled kernels), or "reference (the reasons)"."""
    paths, reasons, unselected = TABLE[op].fast, {}, {}
    for fast in paths:
        failed = next((n for n in fast.needs if not n.holds(call)), None)
        if failed is None:
            compiled = any(n.says == CPU_KERNELS.says for n in fast.needs)
            return fast.name + (f" [{switch.vector_isa()}]" if compiled else "")
        named = len(paths) > 1 and failed is not SWITCH
        # a path the call did not select is only worth naming when no other path was tried
        (unselected if failed.selects else reasons)[
            f"{fast.name}: " * (named or failed.selects) + failed.reason(call)] = None
    if not paths:
        return "reference (no fast path)"
    return f"reference ({'; '.join(reasons or unselected)})"


def _holds(op: str, fast: Fast, call: Call, say: bool) -> bool:
    for need in fast.needs:
        if not need.holds(call):
            if say and need.notice:
                switch.note(f"{op}: the {fast.name} does not take this call "
                            f"({need.reason(call)})")
            return False
    return True
