"""`retnet info`: the size of a model (a preset, or a trained run): parameter counts, per-layer
shapes, and the recurrent state beside the KV cache a same-width Transformer would need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retnet.model import RetNetConfig, RetNetLM
from retnet.options import opt


@dataclass
class InfoOptions:
    """Options of `retnet info`: a preset or a run (one of the two)."""

    run: str | None = opt(None, "a run directory, checkpoint folder or `retnet export --hf` "
                          "folder (instead of --preset)", positional=True, metavar="RUN")
    preset: str | None = opt(None, "preset name, e.g. tiny, small, paper-1.3b")
    vocab_size: int | None = opt(None, "override the preset's vocab_size")

    def __post_init__(self) -> None:
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


def command(opts: InfoOptions) -> int:
    if opts.run is not None:
        from retnet.loading import load

        config, name = load(opts.run)[0].config, f"run {opts.run}"
    else:
        overrides = {} if opts.vocab_size is None else {"vocab_size": opts.vocab_size}
        config = RetNetConfig.from_preset(opts.preset, **overrides)
        name = f"preset {opts.preset}"
    print("\n".join(describe(config, name)))
    return 0
