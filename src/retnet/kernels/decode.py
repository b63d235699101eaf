"""The fused one-token step of a RetNetLM on CPU (`torch.ops.retnet.decode_step`, built by
`retnet.kernels.build`): the model's weights gathered once into the kernel's argument lists (the
plan, cached on the model), then the whole step (every layer, the LM head) in one call. The
fast path of a one-token recurrent step, chosen by `retnet.kernels.dispatch` in
`RetNetLM.forward` and in the decode loop (`retnet.generation.decode_one`); the PyTorch forward
is its reference. The model is read through its attributes only (this layer imports no
module above it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from retnet.ops.rotary import inverse_frequencies

NORM_TYPES = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)
ALL_REAL = torch.empty(0, dtype=torch.bool)  # no attention mask: every row is a real token
_PLAN = "_fused_decode_plan"  # the model attribute that caches the kernel's arguments


def _vec(module, name: str) -> Tensor:
    t = getattr(module, name, None) if module is not None else None
    return torch.empty(0) if t is None else t.detach().float().contiguous()


def _scales(layer) -> Tensor | None:
    """The per-row scales of a weight-only int8 layer (`retnet.modules.quant`), else None."""
    return getattr(layer, "scales", None)


def _layer(block) -> tuple[list, list[Tensor]]:
    """One block's projections in the kernel's order, and its norms' vectors (float32)."""
    r, f = block.retention, block.ffn
    layers = [*r.input_projections(), r.out_proj, f.up]
    layers += ([] if f.gate is None else [f.gate]) + [f.down]
    gn = r.group_norm
    vectors = [_vec(block.norm1, "weight"), _vec(block.norm1, "bias"), _vec(gn, "weight"),
               _vec(gn, "bias"), _vec(block.norm2, "weight"), _vec(block.norm2, "bias")]
    return layers, vectors


def _float_scales(layer) -> Tensor:
    scales = _scales(layer)
    return torch.empty(0) if scales is None else scales.float().contiguous()


def _architecture(config) -> tuple[list[int], list[float]]:
    """decode_step's `ints` and `floats`: every field the kernel lists
    (`torch.ops.retnet.decode_fields()`: "int:NAME[=CHOICES]", then "float:NAME") filled from
    the config by name, a choice coded by its position in the kernel's list (a value the
    kernel cannot code raises ValueError)."""
    derived = {"glu": config.ffn.startswith("glu"),
               "embed_scale": math.sqrt(config.d_model) if config.scale_embeddings else 1.0}
    ints, floats = [], []
    for field in torch.ops.retnet.decode_fields():
        kind, spec = field.split(":", 1)
        name, _, choices = spec.partition("=")
        value = derived[name] if name in derived else getattr(config, name)
        if choices:
            value = choices.split(",").index(value)
        if kind == "int":
            ints.append(int(value))
        else:
            floats.append(float(value))
    return ints, floats


def _stamp(sources: list[Tensor]) -> Tensor:
    """[n, 2]: where each source tensor lives and how often it was written in place; any
    re-store (`.to()`, a layout change) or in-place update (`load_state_dict`) changes it.
    One kernel call (only used where the kernels are loaded)."""
    return torch.ops.retnet.stamp(sources)


def plan(model: nn.Module) -> dict | None:
    """The kernel's arguments for `model` (None where its weights cannot be streamed as they
    are: not all [out, in] rows of one dtype), cached on it and checked against the tensors
    they come from. Needs the CPU kernels loaded."""
    return cached_plan(model, check=True)[2]


def cached_plan(model: nn.Module, check: bool = False) -> tuple[list[Tensor], Tensor,
                                                                  dict | None]:
    """(source tensors, their stamp, plan): the cached entry, made if there is none (or, with
    check, if a source has changed since)."""
    cached = model.__dict__.get(_PLAN)
    if cached is not None and (not check or torch.equal(_stamp(cached[0]), cached[1])):
        return cached
    return _build(model)


def forget_plan(model: nn.Module) -> None:
    """Drop `model`'s cached plan: call after replacing any of its modules (the stamp follows
    the tensors it holds, not modules swapped in beside them; `retnet.modules.quant` does)."""
    model.__dict__.pop(_PLAN, None)


def _build(model: nn.Module) -> tuple[list[Tensor], Tensor, dict | None]:
    """Gather the kernel's arguments and cache them on the model with the tensors they come
    from and those tensors' stamp, until one of them is re-stored or written."""
    layers, vectors = [], []
    for block in model.blocks:
        w, v = _layer(block)
        layers += w
        vectors += v
    layers.append(model.embed if model.lm_head is None else model.lm_head)
    vectors += [_vec(model.norm, "weight"), _vec(model.norm, "bias")]
    weights = [layer.weight.detach() for layer in layers]
    made = None
    # an unmerged LoRA layer (ours or PEFT's: both hold `lora_A`) adds to its base weight's
    # product, which the kernel would leave out: decline, the reference runs
    adapters = any("lora_A" in m._parameters or "lora_A" in m._modules for m in layers)
    if not adapters and all(w.dtype == weights[0].dtype and w.is_contiguous() for w in weights):
        c = model.config
        made = {"embed": model.embed.weight.detach(), "embed_scale": _float_scales(model.embed),
                "weights": weights, "scales": [_float_scales(layer) for layer in layers],
                "vectors": vectors,
                "log_decay": model.blocks[0].retention.log_decay(torch.device("cpu"),
                                                                 torch.float32),
                "inv_freq": inverse_frequencies(c.key_head_dim, torch.float32)}
        made["ints"], made["floats"] = _architecture(c)
    sources = [t for layer in (*layers, model.embed) for t in (layer.weight, _scales(layer))
               if t is not None]
    sources += [t for m in model.modules() if isinstance(m, NORM_TYPES) for t in
                (m.weight, getattr(m, "bias", None)) if t is not None]
    model.__dict__[_PLAN] = cached = (sources, _stamp(sources), made)
    return cached


def fused_decode(model: nn.Module, token: Tensor, state, active: Tensor | None = None,
                 out=None) -> tuple[Tensor, object] | None:
    """One recurrent step on token [B] through the fused kernel: the logits [B, V] and the new
    state (a `RetNetState`), written into out's buffers (or fresh ones); rows with
    active=False are padding, as where `forward`'s attention_mask is 0. The dispatch table's
    conditions hold (CPU, float32/bf16/int8 weights, no autograd, the kernels loaded). None,
    having computed nothing, where the inputs do not match or the weights are not [out, in]
    rows: the caller then runs `model.forward`, which checks them and says what is wrong.
    Every Python call around the kernel runs cold (the step has just streamed the weights
    through the caches): `benchmarks/step_overhead.py`."""
    B, weight = token.shape[0], model.embed.weight  # (each module attribute read is ~20 µs cold)
    if (token.dim() != 1 or len(state.kv) != model.config.n_layers
            or state.offset.shape[0] != B or (active is not None and active.shape != (B,))
            or (out is not None and (out is state or len(out.kv) != len(state.kv)
                                     or out.offset.shape != state.offset.shape))
            or not all(t.dtype == torch.float32 and t.is_contiguous() for t in state.kv)):
        return None
    mask = ALL_REAL if active is None else active.to(torch.bool).contiguous()
    ids = token.long().contiguous()  # no copy when it already is
    out = state.empty_like() if out is None else out
    for _ in range(2):  # a second time after rebuilding a stale plan
        sources, stamp, made = cached_plan(model)
        if made is None:  # e.g. the transposed decode layout: the kernel streams [out, in] rows
            if torch.equal(_stamp(sources), stamp):
                return None
            _build(model)
            continue
        logits = torch.ops.retnet.decode_step(
            ids, mask, state.offset.contiguous(), out.offset,
            made["embed"], made["embed_scale"], made["weights"], made["scales"],
            made["vectors"], list(state.kv), list(out.kv), made["log_decay"],
            made["inv_freq"], made["ints"], made["floats"], sources, stamp)  # [B, V] float32
        if logits.numel():
            if weight.dtype == torch.bfloat16:  # int8 keeps float32 logits
                logits = logits.to(torch.bfloat16)
            return logits, out
        _build(model)  # the weights changed since the plan was made
    return None
