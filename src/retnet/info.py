"""`retnet info`: the size of a model (a preset, or a trained run): parameter counts, per-layer
shapes, and the recurrent state beside the KV cache a same-width Transformer would need; with
`--kernels`, which code each operation runs on this machine and why (the dispatch table's
answers, `retnet.kernels.dispatch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retnet.kernels import dispatch, switch
from retnet.kernels.dispatch import Call
from retnet.model import RetNetConfig, RetNetLM
from retnet.options import opt

F32, BF16, INT8 = torch.float32, torch.bfloat16, torch.int8
# What `retnet info --kernels` asks the dispatch table: calls as this machine's CPU makes them.
KERNEL_CASES: tuple[tuple[str, str, Call], ...] = (
    ("retention, parallel", "retention.parallel", Call("cpu", F32, grad=True)),
    ("retention, chunkwise (training, prefill)", "retention.chunkwise", Call("cpu", F32, True)),
    ("retention, chunkwise, backend='triton'", "retention.chunkwise",
     Call("cpu", F32, True, backend="triton")),
    ("retention, recurrent", "retention.recurrent", Call("cpu", F32)),
    ("decode step (float32)", "decode_step", Call("cpu", F32)),
    ("decode step (bfloat16)", "decode_step", Call("cpu", BF16)),
    ("decode step (int8)", "decode_step", Call("cpu", INT8)),
    ("head-norm+gate (float32)", "head_norm_gate", Call("cpu", F32, grad=True)),
    ("linear, one row (float32)", "linear", Call("cpu", F32, rows=1)),
    ("linear, several rows", "linear", Call("cpu", F32, rows=8)),
    ("norm + projections (training)", "layer_norm_linear", Call("cpu", F32, grad=True)),
    ("activation + down projection (training)", "act_linear", Call("cpu", F32, grad=True)),
    ("output gate (training)", "silu_gate", Call("cpu", F32, grad=True)),
    ("loss over the LM head", "linear_cross_entropy", Call("cpu", F32, grad=True)),
    ("kernels.linear (float32/bf16/int8 rows)", "streamed_linear", Call("cpu", F32)),
)


@dataclass
class InfoOptions:
    """Options of `retnet info`: a preset or a run (one of the two)."""

    run: str | None = opt(None, "a run directory, checkpoint folder or `retnet export --hf` "
                          "folder (instead of --preset)", positional=True, metavar="RUN")
    preset: str | None = opt(None, "preset name, e.g. tiny, small, paper-1.3b")
    vocab_size: int | None = opt(None, "override the preset's vocab_size")
    kernels: bool = opt(False, "which code each operation runs on this machine and why (a "
                        "fast path or the PyTorch reference); no model needed")

    def __post_init__(self) -> None:
        if self.kernels and self.run is None and self.preset is None:
            return
        if (self.run is None) == (self.preset is None):
            raise ValueError("name a model: a run directory (retnet info runs/demo) or "
                             "--preset NAME (retnet info --preset small)")
        if self.run is not None and self.vocab_size is not None:
            raise ValueError("--vocab-size overrides a preset's; a run has its own")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def kv_cache_bytes(config: RetNetConfig, tokens: int, bytes_per_value: int = 4) -> int:
    """The KV cache of a Transformer of the same width and depth (keys and values of d_model
    per layer per token, full multi-head attention) after `tokens` tokens."""
    return 2 * config.n_layers * config.d_model * bytes_per_value * tokens


def describe(config: RetNetConfig, name: str) -> list[str]:
    """The lines `retnet info` prints for `config`."""
    with torch.device("meta"):  # paper sizes build without allocating memory
        model = RetNetLM(config)
    c = config
    total, body = model.num_parameters(), model.num_parameters(embeddings=False)
    lines = [f"{name}: d_model={c.d_model} layers={c.n_layers} heads={c.n_heads} "
             f"K={c.key_head_dim} V={c.value_head_dim} ffn={c.ffn_dim} vocab={c.vocab_size} "
             f"decays={c.decays}",
             f"parameters: {total:,} total, {body:,} non-embedding "
             f"({body / (12 * c.d_model**2 * c.n_layers):.4f} × 12·d²·L)", "per-layer shapes:"]
    lines += [f"  {n:32s} {list(p.shape)}" for n, p in model.blocks[0].named_parameters()]
    state = c.state_bytes_per_sequence
    lines.append(f"recurrent state per sequence (float32): {human_bytes(state)}, at any length")
    for t in (2048, 8192, 32768):
        kv = kv_cache_bytes(c, t)
        lines.append(f"KV cache of a same-width Transformer at {t // 1024}k tokens (float32): "
                     f"{human_bytes(kv)} ({kv / state:.1f}× the state)")
    return lines


def kernel_lines() -> list[str]:
    """The lines `retnet info --kernels` prints: the switch, the C++ kernels, and the path of
    each case of `KERNEL_CASES`, as the dispatch table answers here."""
    state = "on" if switch.enabled() else f"off ({switch.why_off()})"
    built = ("not tried" if not switch.enabled() else f"loaded, {switch.vector_isa()} vectors"
             if switch.cpu_kernels() else "unavailable")
    lines = [f"fast paths: {state}; C++ kernels: {built}"]
    lines += [f"{label}: {dispatch.explain(op, call)}" for label, op, call in KERNEL_CASES]
    return lines


def command(opts: InfoOptions) -> int:
    if opts.kernels:
        print("\n".join(kernel_lines()))
        if opts.run is None and opts.preset is None:
            return 0
    if opts.run is not None:
        from retnet.loading import load

        config, name = load(opts.run)[0].config, f"run {opts.run}"
    else:
        overrides = {} if opts.vocab_size is None else {"vocab_size": opts.vocab_size}
        config = RetNetConfig.from_preset(opts.preset, **overrides)
        name = f"preset {opts.preset}"
    print("\n".join(describe(config, name)))
    return 0
