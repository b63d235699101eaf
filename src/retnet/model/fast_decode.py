"""The model's side of its fast one-token steps: which code runs them, in words
(`decode_path`, what the CLIs print), and the weight layout that suits it
(`use_inference_layout`). Both ask the dispatch table (`retnet.kernels.dispatch`); the fused
step itself is `retnet.kernels.decode`."""

from __future__ import annotations

from retnet.kernels import decode, dispatch, switch
from retnet.kernels.dispatch import Call
from retnet.model import lm
from retnet.modules.layout import set_weight_layout


def decode_path(model: lm.RetNetLM) -> str:
    """Which code runs this model's one-token steps (under no_grad), in words."""
    weight = model.embed.weight
    call = Call(weight.device.type, weight.dtype)
    if dispatch.first("decode_step", call) is None:
        return f"PyTorch {dispatch.explain('decode_step', call)}"
    if decode.plan(model) is None:
        return "PyTorch reference (weights not in the [out, in] layout: use_inference_layout)"
    dtype = str(weight.dtype).removeprefix("torch.")
    return (f"fused CPU kernel ({dtype} weights, float32 state and activations, "
            f"{switch.vector_isa()} vectors)")


def use_inference_layout(model: lm.RetNetLM) -> lm.RetNetLM:
    """The layout with the fastest one-token steps for this model's device and dtype, as the
    table chooses them: the default [out, in] rows where the fused step runs (it streams rows)
    or where no one-row product is split; "decode" (Wᵀ rows, q/k/v/g side by side) where the
    split GEMV of `retnet.kernels.gemv` runs instead of the fused step."""
    p = next(model.parameters())
    one_row = Call(p.device.type, p.dtype, rows=1)
    split = (dispatch.first("linear", one_row) is not None
             and dispatch.first("decode_step", one_row) is None)
    return set_weight_layout(model, "decode" if split else "default")

