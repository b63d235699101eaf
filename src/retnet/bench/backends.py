"""The models the cost benchmark compares, each behind the same three operations:

    decode_setup(batch, context) -> step()   one token per sequence after `context` tokens
    prefill(ids) -> None                     read a prompt, keep the state/cache, last logits
    train_step(ids) -> None                  forward + backward of a [B, T] batch

Ours also runs as its own PyTorch reference (`retnet_reference`: every fast path off), so
that each fast path is timed beside what it replaces. Caches and states for decode are
filled synthetically (random values, the right shapes and positions): the cost of a step
does not depend on the values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from retnet import kernels
from retnet.bench.measure import BENCH_FORM
from retnet.generation import decode_one, prefill
from retnet.model import RetNetConfig, RetNetLM, RetNetState
from retnet.model.fast_decode import decode_path, use_inference_layout
from retnet.modules.layout import set_weight_layout
from retnet.modules.quant import quantize
from retnet.ops import PARALLEL

STATIC_HEADROOM = 256  # static-cache slots beyond the context (warm-up and timed steps)
# The forms RetNet trains in, by the label of their results (retnet-parallel, -chunkwise)
TRAIN_FORMS = {form.mode: form for form in (PARALLEL, BENCH_FORM)}
BF16 = "-bf16"  # a training mode with this suffix runs under bf16 autocast (both models)
REFERENCE = "-reference"  # a result with this suffix: the same cell with every fast path off


def train_autocast(mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for a "-bf16" training mode, as `retnet train --dtype
    bfloat16` runs it; nothing otherwise."""
    if mode.endswith(BF16):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Backend:
    name: str
    model: torch.nn.Module
    config: dict
    non_embedding: int
    decode_setup: Callable[[int, int], Callable[[], None]] | None
    prefill: Callable[[torch.Tensor], None] | None
    train_step: Callable[[torch.Tensor, str], None] | None
    memory_bytes: Callable[[int, int], int]  # state or KV cache bytes for (batch, context)
    train_modes: tuple[str, ...] = ("default",)
    weight_bytes: int = 0  # bytes of weights a decode step reads (RetNet: its floor)
    reference: bool = False  # every call with the fast paths off (name: ours + REFERENCE)

    def train_label(self, mode: str) -> str:
        """retnet-parallel, retnet-chunkwise, llama-sdpa, yet-another-retnet-parallel; a
        reference's ends in REFERENCE (retnet-chunkwise-reference)."""
        if self.reference:
            return f"{self.name.removesuffix(REFERENCE)}-{mode}{REFERENCE}"
        return f"{self.name.removesuffix('-dynamic')}-{mode}"


def _random_state(model: RetNetLM, batch: int, context: int) -> RetNetState:
    state = model.init_state(batch)
    kv = tuple(torch.randn_like(t) * 1e-2 for t in state.kv)
    return RetNetState(kv, torch.full_like(state.offset, context))


def step_weight_bytes(model: RetNetLM) -> int:
    """Bytes of weights one decode step reads: every matrix, norm vector and int8 scale, the
    tied table whole (it is the LM head); an untied input embedding only by one row."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if model.lm_head is not None:
        table = model.embed.weight
        total -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    return total


def retnet_backend(config: RetNetConfig, dtype: torch.dtype = torch.float32,
                   quantization: str | None = None) -> Backend:
    """Ours as `retnet generate` runs it (`use_inference_layout`, the fused CPU step where it
    is built): float32, bf16 weights, or weight-only int8; the state float32 in every case."""
    torch.manual_seed(0)
    model = RetNetLM(config).eval()
    non_embedding = model.num_parameters(embeddings=False)  # before int8 makes them buffers
    if quantization is not None:
        quantize(model, quantization)
        name = f"retnet-{quantization}"
    else:
        model = model.to(dtype)
        name = "retnet" if dtype == torch.float32 else f"retnet-{str(dtype).split('.')[-1]}"

    def decode_setup(batch: int, context: int) -> Callable[[], None]:
        use_inference_layout(model)
        state = _random_state(model, batch, context)
        holder = {"out": state.empty_like(),
                  "token": torch.randint(0, config.vocab_size, (batch,))}

        def step() -> None:
            # the new state goes into one reused buffer (generate() alternates two); the input
            # state is not advanced, so every repeat decodes after the same context
            logits, _ = decode_one(model, holder["token"], state, out=holder["out"])
            holder["token"] = logits.argmax(-1)

        return step

    def do_prefill(ids: torch.Tensor) -> None:
        use_inference_layout(model)
        prefill(model, ids, form=BENCH_FORM)

    def train_step(ids: torch.Tensor, mode: str) -> None:
        set_weight_layout(model, "default")
        model.train()
        # the chunked cross-entropy, as `retnet train` computes it and Llama's step below
        with train_autocast(mode):
            loss = model(ids[:, :-1], mode=TRAIN_FORMS[mode.removesuffix(BF16)],
                         targets=ids[:, 1:]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    trains = dtype == torch.float32 and quantization is None
    return Backend(name, model, {**config.to_dict(), "decode_path": decode_path(model)},
                   non_embedding,
                   decode_setup, do_prefill, train_step if trains else None,
                   lambda b, c: b * config.state_bytes_per_sequence,
                   train_modes=(*TRAIN_FORMS, f"chunkwise{BF16}"),
                   weight_bytes=step_weight_bytes(model))


@contextlib.contextmanager
def fast_paths_off() -> Iterator[None]:
    """Every fast path off inside (`retnet.kernels.set_enabled(False)`: the PyTorch reference
    runs); afterwards the environment decides again (set_enabled(None), $RETNET_KERNELS)."""
    kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(None)


def _off(fn: Callable) -> Callable:
    """fn, each call run with every fast path off."""
    def call(*args, **kwargs):
        with fast_paths_off():
            return fn(*args, **kwargs)

    return call


def retnet_reference(config: RetNetConfig, dtype: torch.dtype = torch.float32,
                     quantization: str | None = None) -> Backend:
    """`retnet_backend` with every fast path off around its set-up and each call: the PyTorch
    reference its fast paths are measured against (issue #33), named ours + "-reference". Its
    own model, built while the switch is off (the layout `use_inference_layout` picks depends
    on the switch, and `decode_path` then says what runs). Decode in each format; prefill and
    chunkwise training in float32 only."""
    with fast_paths_off():
        ours = retnet_backend(config, dtype, quantization)

    def decode_setup(batch: int, context: int) -> Callable[[], None]:
        return _off(_off(ours.decode_setup)(batch, context))

    plain = ours.train_step is not None  # float32 weights
    return replace(ours, name=ours.name + REFERENCE, reference=True, decode_setup=decode_setup,
                   prefill=_off(ours.prefill) if plain else None,
                   train_step=_off(ours.train_step) if plain else None,
                   train_modes=(BENCH_FORM.mode,))


def llama_backends(config: RetNetConfig) -> list[Backend]:
    """transformers' Llama with its default dynamic cache and with its static cache."""
    import inspect

    from transformers import DynamicCache, StaticCache

    from retnet.compare.baselines import llama_loss, llama_non_embedding, matched_llama

    torch.manual_seed(0)
    model = matched_llama(config).eval()
    cfg = model.config
    # transformers renamed the cache argument (past_key_values → cache in 5.2x)
    cache_arg = ("cache" if "cache" in inspect.signature(model.forward).parameters
                 else "past_key_values")
    heads, head_dim, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers

    def kv_bytes(batch: int, context: int) -> int:
        return 2 * layers * batch * heads * head_dim * context * 4

    def fill(cache, batch: int, context: int, static: bool) -> None:
        for layer in range(layers):
            k = torch.randn(batch, heads, context, head_dim) * 1e-2
            kwargs = {"cache_position": torch.arange(context)} if static else {}
            cache.update(k, k.clone(), layer, kwargs)

    def setup(static: bool) -> Callable[[int, int], Callable[[], None]]:
        def decode_setup(batch: int, context: int) -> Callable[[], None]:
            if static:  # it advances by one slot per step: room for every timed step
                cache = StaticCache(config=cfg, max_cache_len=context + STATIC_HEADROOM)
            else:
                cache = DynamicCache(config=cfg)
            fill(cache, batch, context, static)
            token = torch.randint(0, cfg.vocab_size, (batch, 1))

            @torch.no_grad()
            def step() -> None:
                out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
                out.logits[:, -1].argmax(-1)
                if not static:
                    cache.crop(-1)  # drop the new token: the context stays fixed across repeats

            return step

        return decode_setup

    @torch.no_grad()
    def do_prefill(ids: torch.Tensor) -> None:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def train_step(ids: torch.Tensor, mode: str) -> None:
        model.train()
        with train_autocast(mode):
            loss = llama_loss(model, ids[:, :-1], ids[:, 1:])  # RetNet's loss, on its hidden
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    described = {"hidden_size": cfg.hidden_size, "layers": layers, "heads": heads,
                 "head_dim": head_dim, "intermediate_size": cfg.intermediate_size,
                 "vocab_size": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
                 "attention": "sdpa"}
    n = llama_non_embedding(model)
    return [Backend("llama-dynamic", model, described, n, setup(False), do_prefill, train_step,
                    kv_bytes, ("sdpa", f"sdpa{BF16}")),
            Backend("llama-static", model, described, n, setup(True), None, None, kv_bytes)]


def yar_backend(config: RetNetConfig) -> Backend:
    """yet-another-retnet at the same width, depth and heads; its value width is d (not 2d),
    so its FFN is widened to 3.5·d to match 12·d² per layer."""
    from yet_another_retnet.retnet import RetNet

    torch.manual_seed(0)
    d, heads = config.d_model, config.n_heads
    model = RetNet(config.vocab_size, d_model=d, nhead=heads, num_layers=config.n_layers,
                   dropout=0.0, dim_feedforward=7 * d // 2).eval()
    skip = {id(model.embedding.weight), id(model.out.weight), id(model.out.bias)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    head = d // heads

    def decode_setup(batch: int, context: int) -> Callable[[], None]:
        states = [torch.randn(batch, heads, head, head) * 1e-2 for _ in range(config.n_layers)]
        token = torch.randint(0, config.vocab_size, (batch,))

        @torch.no_grad()
        def step() -> None:
            logits, _ = model.forward_recurrent(token, seq_idx=context, prev_states=states)
            logits.argmax(-1)

        return step

    @torch.no_grad()
    def do_prefill(ids: torch.Tensor) -> None:
        model.forward_chunkwise(ids, start_idx=0)

    def train_step(ids: torch.Tensor, mode: str) -> None:
        model.train()
        logits = model.forward_parallel(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    return Backend("yet-another-retnet", model,
                   {"d_model": d, "nhead": heads, "num_layers": config.n_layers,
                    "dim_feedforward": 7 * d // 2, "untied_output_with_bias": True}, n,
                   decode_setup, do_prefill, train_step,
                   lambda b, c: b * config.n_layers * heads * head * head * 4, ("parallel",))


NO_BF16 = ("skipped: this CPU has no bf16 dot products (its bf16 matmul peak is in the "
           "limits: a fifth of float32's on an AVX-512 CPU without AVX512-BF16)")


def build_backends(config: RetNetConfig, skipped: dict[str, str], bf16: bool = True,
                   bf16_compute: bool = True, reference: bool = True) -> list[Backend]:
    """Every backend that can run here; `skipped` receives the others with the reason.
    bf16_compute=False (a CPU without bf16 dot products) drops what computes in bf16: the
    bf16 autocast training modes and the bf16-weight prefill. bf16-weight decode stays (the
    fused step converts each weight to float32 in registers). reference: each of our formats
    followed by its PyTorch reference (`retnet_reference`)."""
    formats = [(torch.float32, None)]
    if bf16:
        formats += [(torch.bfloat16, None), (torch.float32, "int8")]
    backends = []
    for dtype, quantization in formats:
        backends.append(retnet_backend(config, dtype, quantization))
        if not bf16_compute and dtype == torch.bfloat16:
            backends[-1] = replace(backends[-1], prefill=None)
            skipped["retnet-bfloat16 prefill"] = NO_BF16
        if reference:
            backends.append(retnet_reference(config, dtype, quantization))
    try:
        backends += llama_backends(config)
    except ImportError as err:
        skipped["llama"] = f"transformers is not installed ({err.name}): pip install '.[hf]'"
    try:
        backends.append(yar_backend(config))
    except ImportError as err:
        skipped["yet-another-retnet"] = (f"not installed ({err.name}): pip install "
                                         "yet-another-retnet einops")
    if not bf16_compute:
        backends = [replace(b, train_modes=tuple(m for m in b.train_modes if not m.endswith(BF16)))
                    for b in backends]
        skipped["bf16 autocast training"] = NO_BF16
    return backends
