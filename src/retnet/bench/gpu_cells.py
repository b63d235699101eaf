"""The cells of `benchmarks/gpu.py` (`retnet.bench.gpu`): each one measurement that returns a
dict of numbers, or raises `Skip` (recorded as "skipped: why") or any error (recorded, the
run goes on). Four kinds:

    check_chunkwise / check_step   Triton kernel against the PyTorch form, float32: the
                                   largest relative error of outputs, state, every gradient
    op_cell                        one retention op forward + backward (ours, FLA's)
    train_cell                     one model's training step: tokens/s and peak memory
    decode_cell                    one model's decode step after a context, batch B

Models are built on the device in bf16 and kept one at a time (`Models`), so a cell's peak
memory holds its own model's weights only.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from retnet.compare.baselines import llama_loss
from retnet.model import RetNetConfig, RetNetLM, RetNetState
from retnet.ops import Form, log_decays, retention_chunkwise
from retnet.ops.retention import retention_step

GiB = 2**30
DTYPE = torch.bfloat16  # weights and autocast of every model
NO_TRITON = "no Triton path here (the notice on stderr says why)"


class Skip(Exception):
    """A cell that cannot run here; its message is the reason recorded."""


@dataclass
class Plan:
    """What one run measures (`full` on a GPU, `quick` for the plumbing on a CPU)."""

    device: torch.device
    config: RetNetConfig
    lengths: list[int]  # training T
    tokens_per_step: int  # batch = tokens_per_step // T
    contexts: list[int]  # decode after this many tokens
    batches: list[int]  # decode batch sizes
    check_shapes: dict[str, tuple[int, int, int, int, int]]  # case → B, T, H, K, V
    chunk_size: int = 64
    train_steps: int = 3
    decode_steps: int = 20
    warmup: int = 1

    @classmethod
    def full(cls, device: torch.device) -> Plan:
        # about 350M parameters: 24 layers of 12·d² at d = 1024, plus the 32k × 1024 table
        config = RetNetConfig(d_model=1024, n_layers=24, n_heads=4)
        H, K, V = config.n_heads, config.key_head_dim, config.value_head_dim
        return cls(device, config, [2048, 8192, 32768], 32768, [8192, 32768], [1, 8, 64],
                   {"T=4096": (2, 4096, H, K, V), "padded T=4000": (2, 4000, H, K, V)})

    @classmethod
    def quick(cls, device: torch.device) -> Plan:
        # The plumbing only, at the smallest shapes that still cross chunks (a partial one
        # in the padded case) and time each cell once: on a CPU the Triton cells run in
        # Triton's interpreter, whose cost grows with every token and every call.
        config = RetNetConfig.from_preset("tiny", vocab_size=256, n_layers=1)
        return cls(device, config, [32, 64], 64, [64, 128], [1, 2],
                   {"T=32": (2, 32, 2, 16, 32), "padded T=40": (2, 40, 2, 16, 32)},
                   chunk_size=16, train_steps=1, decode_steps=1, warmup=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop the last cell's tensors (an error's frames hold them in reference cycles) and
    CUDA's cached blocks, so that the next cell's peak memory is its own. A CPU run measures no
    memory, and there a full collection costs more than a quick cell."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def timed_runs(fn: Callable[[], Any], n: int, warmup: int, device: torch.device) -> dict:
    """Median / min seconds of n synchronised calls after `warmup` ones, and the peak memory
    (GiB, CUDA only) over the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return {"median_s": statistics.median(times), "min_s": min(times), "raw_s": times,
            "peak_gib": peak}


def triton_here(device: torch.device) -> bool:
    """Whether Form(..., backend="triton") runs the kernels here (else it says why once)."""
    from retnet.kernels import triton_path

    return triton_path(torch.empty(0, device=device))


# 1. Kernel against reference ---------------------------------------------------------------

def rel_err(a: Tensor | None, b: Tensor | None) -> float | None:
    """max |a − b| / max |b| (None when either is missing)."""
    if a is None or b is None:
        return None
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _retention_inputs(plan: Plan, B: int, T: int, H: int, K: int, V: int, padded: bool):
    """float32 q, k [B, T, H, K], v [B, T, H, V], log γ [H], state [B, H, K, V], mask [B, T]
    (row 1 left-padded by a tenth of T when `padded`), all leaves requiring grad."""
    g = torch.Generator(device=plan.device).manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, device=plan.device) * scale).requires_grad_()

    q, k = rand(B, T, H, K, scale=K**-0.5), rand(B, T, H, K, scale=K**-0.5)
    v, state = rand(B, T, H, V), rand(B, H, K, V, scale=0.1)
    log_decay = log_decays(H, device=plan.device).requires_grad_()
    mask = None
    if padded:
        mask = torch.ones(B, T, device=plan.device)
        mask[1 % B, : T // 10] = 0
    return q, k, v, log_decay, state, mask


def check_chunkwise(plan: Plan, case: str) -> dict:
    """The Triton chunkwise form (forward + backward) against `retention_chunkwise`."""
    if not triton_here(plan.device):
        raise Skip(NO_TRITON)
    from retnet.kernels.triton_retention import chunkwise_retention

    B, T, H, K, V = plan.check_shapes[case]
    q, k, v, log_decay, state, mask = _retention_inputs(plan, B, T, H, K, V, "padded" in case)
    leaves = {"dq": q, "dk": k, "dv": v, "dlog_decay": log_decay, "dstate": state}
    results = {}
    for name, fn in (("triton", chunkwise_retention), ("torch", retention_chunkwise)):
        o, final = fn(q, k, v, log_decay, state, mask, chunk_size=plan.chunk_size)
        seed = torch.Generator(device=plan.device).manual_seed(1)
        do = torch.randn(o.shape, generator=seed, device=plan.device)
        d_final = torch.randn(final.shape, generator=seed, device=plan.device)
        grads = torch.autograd.grad((o * do).sum() + (final * d_final).sum(),
                                    list(leaves.values()), allow_unused=True)
        results[name] = {"o": o.detach(), "final_state": final.detach(),
                         **dict(zip(leaves, grads))}
    errors = {key: rel_err(results["triton"][key], results["torch"][key])
              for key in results["torch"]}
    return {"shape": dict(zip("BTHKV", (B, T, H, K, V))), "chunk_size": plan.chunk_size,
            "tf32": torch.backends.cuda.matmul.allow_tf32, "max_rel_err": errors}


def check_step(plan: Plan, case: str) -> dict:
    """The fused Triton step against `retnet.ops.retention.retention_step` (one padded row)."""
    if not triton_here(plan.device):
        raise Skip(NO_TRITON)
    from retnet.kernels import triton_retention

    B, _, H, K, V = plan.check_shapes[case]
    B = 8
    q, k, v, log_decay, state, _ = _retention_inputs(plan, B, 1, H, K, V, False)
    q, k, v, state = (t.detach() for t in (q[:, 0], k[:, 0], v[:, 0], state))
    mask = torch.ones(B, device=plan.device)
    mask[0] = 0
    with torch.no_grad():
        o_ref, s_ref = retention_step(q, k, v, log_decay, state, mask)
        o, s = triton_retention.retention_step(q, k, v, log_decay, state, mask)
    return {"shape": dict(zip("BHKV", (B, H, K, V))),
            "max_rel_err": {"o": rel_err(o, o_ref), "new_state": rel_err(s, s_ref)}}


# 2a. Retention op, forward + backward ------------------------------------------------------

def _fla_op(name: str) -> Callable:
    try:
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise Skip("flash-linear-attention not installed") from err
    fn = chunk_retention if name == "fla-chunk_retention" else chunk_simple_gla
    params = inspect.signature(fn).parameters
    layout = {"head_first": False} if "head_first" in params else {}  # ours: [B, T, H, K]

    def op(q, k, v, log_decay):
        if fn is chunk_retention:  # its own decays: γ = 1 − 2^(−5 − h), as RetNet's paper
            return fn(q, k, v, scale=1.0, output_final_state=True, **layout)
        if "g_gamma" in params:  # a constant log γ per head [H], as ours
            decay = {"g_gamma": log_decay.float()}
        else:  # older releases: log γ per token and head [B, T, H]
            decay = {"g": log_decay.float().expand(*q.shape[:3]).contiguous()}
        return fn(q, k, v, scale=1.0, output_final_state=True, **decay, **layout)

    return op


def _op(plan: Plan, name: str) -> Callable:
    """(q, k, v, log γ) -> (o, final state) for ours (triton, torch) or FLA's."""
    if name.startswith("fla-"):
        return _fla_op(name)
    if name == "retnet-triton":
        if not triton_here(plan.device):
            raise Skip(NO_TRITON)
        from retnet.kernels.triton_retention import chunkwise_retention as fn
    else:
        fn = retention_chunkwise
    return lambda q, k, v, ld: fn(q, k, v, ld, chunk_size=plan.chunk_size)


def op_cell(plan: Plan, name: str, T: int) -> dict:
    """Forward + backward of one retention op on bf16 q, k, v at the training shapes."""
    op = _op(plan, name)
    c = plan.config
    B, H, K, V = plan.tokens_per_step // T, c.n_heads, c.key_head_dim, c.value_head_dim
    dev = plan.device
    q, k = (torch.randn(B, T, H, K, device=dev, dtype=DTYPE) * K**-0.5 for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, dtype=DTYPE)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    log_decay = log_decays(H, device=dev)

    def step() -> None:
        o, _ = op(q, k, v, log_decay)
        o.backward(torch.ones_like(o))
        q.grad = k.grad = v.grad = None

    timing = timed_runs(step, plan.train_steps, plan.warmup, dev)
    return {"B": B, "ms": 1e3 * timing["median_s"], **timing}


# 2b. Training step, 3. decode -------------------------------------------------------------

@dataclass
class Models:
    """One bf16 model on the device at a time: "retnet" or "llama" (matched to the config)."""

    plan: Plan
    held: dict[str, torch.nn.Module] = field(default_factory=dict)

    def get(self, kind: str) -> torch.nn.Module:
        if kind not in self.held:
            self.held.clear()
            free_memory(self.plan.device)
            torch.manual_seed(0)
            with torch.device(self.plan.device):
                if kind == "retnet":
                    model = RetNetLM(self.plan.config)
                else:
                    from retnet.compare.baselines import matched_llama

                    model = matched_llama(self.plan.config)
            self.held[kind] = model.to(DTYPE)
        return self.held[kind]


def _form(plan: Plan, name: str, mode: str) -> Form:
    backend = "triton" if name.endswith("triton") else "torch"
    return Form(mode, chunk_size=plan.chunk_size, backend=backend)  # type: ignore[arg-type]


def _backend_used(plan: Plan, name: str) -> str:
    if name.endswith("triton") and not triton_here(plan.device):
        return "torch (the Triton path fell back)"
    return name.rsplit("-", 1)[-1]


def train_cell(plan: Plan, models: Models, name: str, T: int) -> dict:
    """Forward + backward (no optimizer) of a [B, T] batch, B = tokens_per_step // T, under
    bf16 autocast; both models' loss through the same chunked cross-entropy."""
    B = plan.tokens_per_step // T
    dev = plan.device
    ids = torch.randint(0, plan.config.vocab_size, (B, T + 1), device=dev)
    model = models.get("llama" if name.startswith("llama") else "retnet").train()
    form = None if name.startswith("llama") else _form(plan, name, "chunkwise")

    def step() -> None:
        try:
            with torch.autocast(dev.type, dtype=DTYPE):
                if form is None:
                    loss = llama_loss(model, ids[:, :-1], ids[:, 1:])
                else:
                    loss = model(ids[:, :-1], mode=form, targets=ids[:, 1:]).loss
            loss.backward()
        finally:  # an out-of-memory backward leaves no gradients behind for the next cell
            model.zero_grad(set_to_none=True)

    timing = timed_runs(step, plan.train_steps, plan.warmup, dev)
    return {"B": B, "tokens_per_s": B * T / timing["median_s"],
            "backend": "sdpa" if form is None else _backend_used(plan, name), **timing}


def _retnet_decode(plan: Plan, model: RetNetLM, name: str, batch: int, context: int):
    """A RetNet state of random values at position `context`, and one recurrent step."""
    state = model.init_state(batch, plan.device)
    state = RetNetState(tuple(torch.randn_like(t) * 1e-2 for t in state.kv),
                        torch.full_like(state.offset, context))
    out, form = state.empty_like(), _form(plan, name, "recurrent")
    token = torch.randint(0, plan.config.vocab_size, (batch, 1), device=plan.device)
    return lambda: model.step(token, state, out, mode=form).logits.argmax(-1)


def kv_cache_bytes(cfg: Any, batch: int, slots: int) -> int:
    """Bytes of a bf16 static KV cache: keys and values, every layer, `slots` positions."""
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.head_dim * slots * 2


def _llama_decode(plan: Plan, model: Any, batch: int, context: int):
    """transformers' StaticCache filled with random keys/values for `context` positions."""
    from transformers import StaticCache

    from retnet.bench.backends import STATIC_HEADROOM

    cfg, slots = model.config, context + STATIC_HEADROOM
    if plan.device.type == "cuda":
        need, free = kv_cache_bytes(cfg, batch, slots), torch.cuda.mem_get_info(plan.device)[0]
        if need > 0.9 * free:
            raise Skip(f"KV cache {need / GiB:.1f} GiB over the free {free / GiB:.1f} GiB")
    cache = StaticCache(config=cfg, max_cache_len=slots)
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, device=plan.device, dtype=DTYPE) * 1e-2
        cache.update(k, k.clone(), layer, {"cache_position": torch.arange(context,
                                                                         device=plan.device)})
    # transformers renamed the cache argument (past_key_values → cache in 5.2x)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=plan.device)
    return lambda: model(input_ids=token, use_cache=True, **{arg: cache}).logits.argmax(-1)


def decode_cell(plan: Plan, models: Models, name: str, batch: int, context: int) -> dict:
    """One token per sequence through the whole model (LM head and greedy choice included)."""
    llama = name.startswith("llama")
    model = models.get("llama" if llama else "retnet").eval()
    with torch.no_grad():
        step = (_llama_decode(plan, model, batch, context) if llama
                else _retnet_decode(plan, model, name, batch, context))
        timing = timed_runs(step, plan.decode_steps, 3 * plan.warmup, plan.device)
    return {"ms_per_step": 1e3 * timing["median_s"], "tokens_per_s": batch / timing["median_s"],
            "backend": "static cache, sdpa" if llama else _backend_used(plan, name), **timing}


def parameter_counts(config: RetNetConfig) -> dict[str, int]:
    """Non-embedding parameters of RetNet and of the matched Llama (built on the meta device)."""
    from transformers import LlamaForCausalLM

    from retnet.compare.baselines import (
        llama_non_embedding,
        matched_llama_config,
        retnet_non_embedding,
    )

    llama_config = matched_llama_config(config)
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    return {"retnet_non_embedding": retnet_non_embedding(config),
            "llama_non_embedding": llama_non_embedding(llama),
            "llama_intermediate_size": llama_config.intermediate_size,
            "embedding": config.vocab_size * config.d_model}
