"""The fused one-token step for RetNetLM on CPU (`torch.ops.retnet.decode_step`, built by
`retnet.kernels`): the model's weights gathered once into the kernel's argument lists, then the
whole step (every layer, the LM head) in one call. `RetNetLM.forward` asks it first for a
one-token recurrent step under no_grad and runs the PyTorch reference whenever it declines
(kernels off or unavailable, float64, another device, a transposed weight layout, hidden states
asked for, dropout in training mode)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retnet import kernels
from retnet.model import lm
from retnet.model.state import RetNetState
from retnet.modules.layout import set_weight_layout
from retnet.modules.quant import weight_scales
from retnet.ops.rotary import inverse_frequencies

NORM_TYPES = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # int8: retnet.modules.quant
NORM_CODES = {"layer": 0, "rms": 1}
HEAD_NORM_CODES = {"group": 0, "rms": 1, "none": 2}
FFN_CODES = {"gelu": 0, "glu-gelu": 1, "glu-swish": 2}


def _vec(module, name: str) -> Tensor:
    t = getattr(module, name, None) if module is not None else None
    return torch.empty(0) if t is None else t.detach().float().contiguous()


def _layer(block) -> tuple[list, list[Tensor]]:
    """One block's projections in the kernel's order, and its norms' vectors (float32)."""
    r, f = block.retention, block.ffn
    layers = [*r.input_projections(), r.out_proj, f.up]
    layers += ([] if f.gate is None else [f.gate]) + [f.down]
    gn = r.group_norm
    vectors = [_vec(block.norm1, "weight"), _vec(block.norm1, "bias"), _vec(gn, "weight"),
               _vec(gn, "bias"), _vec(block.norm2, "weight"), _vec(block.norm2, "bias")]
    return layers, vectors


def _scales(layer) -> Tensor:
    scales = weight_scales(layer)
    return torch.empty(0) if scales is None else scales.float().contiguous()


ALL_REAL = torch.empty(0, dtype=torch.bool)  # no attention mask: every row is a real token
PLAN = "_fused_decode_plan"  # the model attribute that caches the kernel's arguments


def _stamp(sources: list[Tensor]) -> Tensor:
    """[n, 2]: where each source tensor lives and how often it was written in place; any
    re-store (`.to()`, a layout change) or in-place update (`load_state_dict`) changes it.
    One kernel call (only used where the kernels are loaded)."""
    return torch.ops.retnet.stamp(sources)


def _plan(model: lm.RetNetLM) -> dict | None:
    """The kernel's arguments for `model` (None where its weights cannot be streamed as they
    are), cached on it and checked against the tensors they come from."""
    cached = model.__dict__.get(PLAN)
    if cached is not None and torch.equal(_stamp(cached[0]), cached[1]):
        return cached[2]
    return _build(model)[2]


def _build(model: lm.RetNetLM) -> tuple[list[Tensor], Tensor, dict | None]:
    """Gather the kernel's arguments and cache them on the model with the tensors they come
    from and those tensors' stamp, until one of them is re-stored or written
    (`retnet.modules.quant.quantize` drops the cache: it replaces modules)."""
    layers, vectors = [], []
    for block in model.blocks:
        w, v = _layer(block)
        layers += w
        vectors += v
    layers.append(model.embed if model.lm_head is None else model.lm_head)
    vectors += [_vec(model.norm, "weight"), _vec(model.norm, "bias")]
    weights = [layer.weight.detach() for layer in layers]
    plan = None
    if all(w.dtype == weights[0].dtype and w.is_contiguous() for w in weights):
        c = model.config
        plan = {"embed": model.embed.weight.detach(), "embed_scale": _scales(model.embed),
                "weights": weights, "scales": [_scales(layer) for layer in layers],
                "vectors": vectors,
                "log_decay": model.blocks[0].retention.log_decay(torch.device("cpu"),
                                                                 torch.float32),
                "inv_freq": inverse_frequencies(c.key_head_dim, torch.float32),
                "ints": [c.n_layers, c.n_heads, c.key_head_dim, c.value_head_dim, c.d_model,
                         c.ffn_dim, c.vocab_size, NORM_CODES[c.norm],
                         HEAD_NORM_CODES[c.head_norm], FFN_CODES[c.ffn], int(c.use_gate),
                         int(c.ffn.startswith("glu"))],
                "floats": [c.norm_eps, math.sqrt(c.d_model) if c.scale_embeddings else 1.0]}
    sources = [t for layer in (*layers, model.embed) for t in (layer.weight,
                                                               weight_scales(layer))
               if t is not None]
    sources += [t for m in model.modules() if isinstance(m, NORM_TYPES) for t in
                (m.weight, getattr(m, "bias", None)) if t is not None]
    model.__dict__[PLAN] = cached = (sources, _stamp(sources), plan)
    return cached


def _applies(model: lm.RetNetLM, weight: Tensor, token: Tensor, state: RetNetState) -> bool:
    return (token.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dtype in WEIGHT_DTYPES
            and not torch.is_grad_enabled() and (not model.training or model.config.dropout == 0)
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in state.kv))


def fused_decode(model: lm.RetNetLM, token: Tensor, state: RetNetState,
                 active: Tensor | None = None, out: RetNetState | None = None
                 ) -> tuple[Tensor, RetNetState] | None:
    """One recurrent step on token [B] through the fused kernel: the logits [B, V] and the new
    state, written into out's buffers (or fresh ones); rows with active=False are padding,
    as where `forward`'s attention_mask is 0. None, having computed nothing, where the kernel
    does not apply or the inputs do not match: the caller then runs `model.forward`, which
    checks them and says what is wrong. The decode loops call this directly: every Python
    call around the kernel runs cold (the step has just streamed the weights through the
    caches), and `forward`'s cost 0.1-0.2 ms a step (`benchmarks/step_overhead.py`)."""
    B, weight = token.shape[0], model.embed.weight  # (each module attribute read is ~20 µs cold)
    if (token.dim() != 1 or len(state.kv) != model.config.n_layers
            or state.offset.shape[0] != B or (active is not None and active.shape != (B,))
            or (out is not None and (out is state or len(out.kv) != len(state.kv)
                                     or out.offset.shape != state.offset.shape))
            or not _applies(model, weight, token, state)
            or not kernels.cpu_kernels()):
        return None
    mask = ALL_REAL if active is None else active.to(torch.bool).contiguous()
    ids = token.long().contiguous()  # no copy when it already is
    out = state.empty_like() if out is None else out
    for _ in range(2):  # a second time after rebuilding a stale plan
        sources, stamp, plan = model.__dict__.get(PLAN) or _build(model)
        if plan is None:  # e.g. the transposed decode layout: the kernel streams [out, in] rows
            if torch.equal(_stamp(sources), stamp):
                return None
            _build(model)
            continue
        logits = torch.ops.retnet.decode_step(
            ids, mask, state.offset.contiguous(), out.offset,
            plan["embed"], plan["embed_scale"], plan["weights"], plan["scales"],
            plan["vectors"], list(state.kv), list(out.kv), plan["log_decay"],
            plan["inv_freq"], plan["ints"], plan["floats"], sources, stamp)  # [B, V] float32
        if logits.numel():
            if weight.dtype == torch.bfloat16:  # int8 keeps float32 logits
                logits = logits.to(torch.bfloat16)
            return logits, out
        _build(model)  # the weights changed since the plan was made
    return None


def fused_step(model: lm.RetNetLM, input_ids: Tensor, state: RetNetState,
               attention_mask: Tensor | None, state_out: RetNetState | None
               ) -> lm.RetNetOutput | None:
    """`RetNetLM.forward`'s fast step (inputs validated by it): a one-token recurrent step on
    input_ids [B, 1] through `fused_decode`; None where that declines."""
    if input_ids.shape[1] != 1:
        return None
    active = None if attention_mask is None else attention_mask[:, 0]
    result = fused_decode(model, input_ids[:, 0], state, active, state_out)
    return None if result is None else lm.RetNetOutput(result[0].unsqueeze(1), result[1])


def decode_path(model: lm.RetNetLM) -> str:
    """Which code runs this model's one-token steps, in words (what the CLIs print)."""
    weight = model.embed.weight
    dtype = str(weight.dtype).removeprefix("torch.")
    if weight.device.type != "cpu":
        return f"PyTorch ({weight.device.type}, {dtype} weights)"
    if weight.dtype not in WEIGHT_DTYPES:
        return f"PyTorch reference ({dtype} weights have no fused kernel)"
    if not kernels.enabled():
        return f"PyTorch reference (fast paths off: {kernels.ENV}=0 or set_enabled(False))"
    if not kernels.cpu_kernels():
        return "PyTorch reference (the CPU kernels are unavailable here)"
    if _plan(model) is None:
        return "PyTorch reference (weights not in the [out, in] layout: use_inference_layout)"
    return f"fused CPU kernel ({dtype} weights, float32 state and activations)"


def use_inference_layout(model: lm.RetNetLM) -> lm.RetNetLM:
    """The layout with the fastest one-token steps for this model's device and dtype: the
    default [out, in] rows wherever the fused CPU kernel runs (`retnet.kernels`: it streams
    rows) or on other devices; "decode" for float32 on a CPU without the kernels (where
    `retnet.ops.linear` splits GEMVs across cores)."""
    p = next(model.parameters())
    split = (p.device.type == "cpu" and p.dtype == torch.float32
             and not kernels.cpu_kernels())
    return set_weight_layout(model, "decode" if split else "default")


lm.FAST_STEPS.append(fused_step)
