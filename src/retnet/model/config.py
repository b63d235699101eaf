"""RetNetConfig: the architecture of a RetNet language model, with named presets and validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from retnet.ops.decay import DECAY_SCHEMES

NORMS = ("layer", "rms")
HEAD_NORMS = ("group", "rms", "none")
FFNS = ("gelu", "glu-gelu", "glu-swish")


@dataclass(frozen=True)
class RetNetConfig:
    """Architecture fields only; training, generation and benchmark options live elsewhere.

    Sizes (paper §3.1): key head dim K = d_model / n_heads (W_Q, W_K are d×d); value width
    value_dim = H·V, 2·d by default (W_V, W_G d×2d, W_O 2d×d); FFN hidden ffn_dim, 2·d by default.
    The defaults are the paper's model; the variant fields represent other published RetNets
    (torchscale: norm="rms", head_norm="rms", ffn="glu-gelu", scale_embeddings=False, decays="eq8")
    and the paper's ablations (use_gate=False, head_norm="none", decays="none"/"single"); with
    decays="none", use_gate=False, rotation=False it is a plain linear-attention Transformer.
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 2
    value_dim: int | None = None  # H·V; None means 2·d_model
    ffn_dim: int | None = None  # FFN hidden width; None means 2·d_model
    # The paper's experiments use one decay span for every size; "eq8" is torchscale's schedule.
    decays: str = "multiscale"
    dropout: float = 0.0
    # Used by every norm; the forms agree exactly at any eps.
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    norm: str = "layer"  # block and final norms: "layer" (LayerNorm) or "rms" (RMSNorm)
    # Per-head norm of the retention output: "group" (GroupNorm, affine), "rms" (no affine), "none"
    head_norm: str = "group"
    ffn: str = "gelu"  # "gelu": W2·gelu(W1·x); "glu-gelu", "glu-swish": W2·(act(W1·x) ⊙ W3·x)
    scale_embeddings: bool = True  # multiply input embeddings by √d_model
    use_gate: bool = True  # the swish gate (paper Table 6 ablates it)
    # False: q and k are not rotated, positions enter through decay and causality alone; with
    # decays="none" and use_gate=False this is plain linear attention (the paper's baseline).
    rotation: bool = True

    def __post_init__(self) -> None:
        # Resolve the derived widths once, so the config (and its fingerprint) is explicit.
        if self.value_dim is None:
            object.__setattr__(self, "value_dim", 2 * self.d_model)
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 2 * self.d_model)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "value_dim", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name, allowed in (("norm", NORMS), ("head_norm", HEAD_NORMS), ("ffn", FFNS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"valid n_heads here: {_divisors(self.d_model)}"
            )
        if self.value_dim % self.n_heads:
            raise ValueError(f"value_dim ({self.value_dim}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.key_head_dim % 2:
            raise ValueError(
                f"n_heads={self.n_heads} gives an odd key head dim {self.key_head_dim} = "
                "d_model / n_heads; rotation needs it even: change d_model or n_heads"
            )
        if self.decays not in DECAY_SCHEMES:
            raise ValueError(
                f"decays must be one of {', '.join(DECAY_SCHEMES)}; got {self.decays!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive; got {self.norm_eps!r}")

    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.n_heads

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of float32 recurrent state per sequence: per layer H·K·(V+1), plus the offset."""
        per_layer = self.n_heads * self.key_head_dim * (self.value_head_dim + 1) * 4
        return self.n_layers * per_layer + 8

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RetNetConfig:
        """A named preset with keyword overrides, e.g. from_preset("tiny", vocab_size=256)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RetNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown config field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the fields that shape the weights and the state."""
        fields = {k: v for k, v in self.to_dict().items() if k != "dropout"}
        # Fields added later count only when set away from the old behaviour, so that the
        # fingerprints of earlier checkpoints and state files still match.
        fields = {k: v for k, v in fields.items()
                  if k not in _ADDED_LATER or v != _ADDED_LATER[k]}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_LATER: dict[str, Any] = {"rotation": True}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


# Only the fields each preset sets: derived widths follow any override (e.g. of d_model).
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: under 1M parameters at vocab_size 256.
    "tiny": dict(d_model=64, n_layers=2, n_heads=2),
    # Trains in minutes on two CPU cores: about 4.7M non-embedding parameters.
    "demo": dict(d_model=256, n_layers=6, n_heads=4),
    # The CPU benchmark size (K = 256, V = 512 as the paper's heads).
    "small": dict(d_model=512, n_layers=8, n_heads=2),
    "medium": dict(d_model=768, n_layers=12, n_heads=3),
    # Paper Table 2: key head dim 256, value head dim 512.
    "paper-1.3b": dict(d_model=2048, n_layers=24, n_heads=8),
    "paper-2.7b": dict(d_model=2560, n_layers=32, n_heads=10),
    "paper-6.7b": dict(d_model=4096, n_layers=32, n_heads=16),
}
