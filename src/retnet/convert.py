"""Weights from microsoft/torchscale's RetNetDecoder into the one RetNetLM, exactly.

torchscale's architecture is a set of config variants of ours (RMSNorm blocks, a per-head RMS
norm without affine, a GLU FFN, eq. 8 decays, no embedding scale by default, untied output,
any value and FFN width); its retention maths (rotation, decay-normalised mask, score
normalisation) equals ours in the parallel form. Only tensors are read: a state_dict saved
with torch.save (loaded with weights_only=True) or a safetensors file. What the weights do not
record (activation, norm eps, embedding scale) must be given with --arch: it is never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from retnet.model import RetNetConfig
from retnet.ops import log_decays

EXTRACT_HINT = (
    "it holds pickled Python objects (a fairseq checkpoint?), which are never unpickled here; "
    "extract the weights once, in Python, from a file you trust: "
    "torch.save(torch.load(CKPT, weights_only=False)['model'], 'weights.pt')")
UNSUPPORTED = {"deepnorm": True, "multiway": True, "layernorm_embedding": True,
               "xpos_rel_pos": True, "moe_freq": lambda v: v != 0,
               "decoder_normalize_before": False}
# What changes the outputs but is not recorded in the weights: asked for, never guessed.
REQUIRED = ("activation_fn", "layernorm_eps", "no_scale_embedding")
ARCH_EXAMPLE = '{"activation_fn": "gelu", "layernorm_eps": 1e-6, "no_scale_embedding": true}'
ACTIVATIONS = ("gelu", "swish")  # torchscale's relu GLU has no FFN kind here


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """A flat {name: tensor} from safetensors or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error type
            raise ValueError(f"cannot read {path}: it is not a valid safetensors file "
                             f"({str(err).splitlines()[0]})") from None
    with path.open("rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle stream)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise ValueError(f"cannot read {path}: it is neither a torch.save file nor safetensors; "
                         "pass the model's state_dict (.pt) or .safetensors")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"cannot read {path}: {EXTRACT_HINT}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path} is not a state_dict of tensors; {EXTRACT_HINT}")
    return data


def read_arch(source: str | None) -> dict[str, Any]:
    """--arch: a JSON file or inline JSON (a string starting with '{')."""
    if source is None:
        return {}
    inline = source.lstrip().startswith("{")
    where = "--arch" if inline else f"--arch {source}"
    try:
        arch = json.loads(source if inline else Path(source).read_text())
    except OSError as err:
        raise ValueError(f"{where}: {err.strerror}; pass a JSON file or inline JSON such as "
                         f"'{ARCH_EXAMPLE}'") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(arch, dict):
        raise ValueError(f"{where} must be a JSON object of torchscale RetNetConfig arguments")
    return arch


def _strip_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """fairseq models keep the decoder under 'decoder.'."""
    if any(k.startswith("decoder.") for k in tensors):
        return {k.removeprefix("decoder."): v for k, v in tensors.items()
                if k.startswith("decoder.")}
    return tensors


def _check_arch(tensors: dict[str, Tensor], arch: dict[str, Any]) -> None:
    """Refuse variants with no equivalent here and ask for what the weights cannot tell."""
    for key, bad in UNSUPPORTED.items():
        value = arch.get(key)
        if value is not None and (bad(value) if callable(bad) else value == bad):
            raise ValueError(f"torchscale option {key}={value!r} has no equivalent here")
    if "layer_norm.weight" not in tensors:  # torchscale keeps no final norm after post-LN
        raise ValueError("this torchscale model has post-LayerNorm blocks (it was built with "
                         "decoder_normalize_before=False, no final layer_norm); only pre-norm "
                         "RetNets convert")
    if "layernorm_embedding.weight" in tensors or any("moe_layer" in k for k in tensors):
        raise ValueError("torchscale's layernorm_embedding and mixture-of-experts variants have "
                         "no equivalent here")
    missing = [k for k in REQUIRED if k not in arch]
    if missing:
        raise ValueError(f"the weights do not record {', '.join(missing)}: pass them with "
                         f"--arch (a JSON file or inline JSON such as '{ARCH_EXAMPLE}'), "
                         "as the model was built")
    if arch["activation_fn"] not in ACTIVATIONS:
        raise ValueError(f"activation_fn {arch['activation_fn']!r} has no equivalent here: "
                         "this converter maps torchscale's GLU with gelu or swish only")
    eps, scale = arch["layernorm_eps"], arch["no_scale_embedding"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"--arch layernorm_eps must be a positive number; got {eps!r}")
    if not isinstance(scale, bool):
        raise ValueError(f"--arch no_scale_embedding must be true or false; got {scale!r}")


def torchscale_config(tensors: dict[str, Tensor], arch: dict[str, Any]) -> RetNetConfig:
    """Our config for a torchscale state_dict; arch holds torchscale's argument names
    (e.g. from its RetNetConfig) and wins over what the tensor shapes say."""
    _check_arch(tensors, arch)
    embed = tensors["embed_tokens.weight"]
    d = arch.get("decoder_embed_dim", embed.shape[1])
    layers = arch.get("decoder_layers",
                      1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("layers.")))
    if "decoder_retention_heads" in arch:
        heads = arch["decoder_retention_heads"]
    elif "retnet_rel_pos.decay" in tensors:
        heads = tensors["retnet_rel_pos.decay"].numel()
    else:
        raise ValueError("cannot tell the number of heads: pass an --arch JSON with "
                         "decoder_retention_heads")
    tied = bool(arch.get("share_decoder_input_output_embed", False)) or (
        "output_projection.weight" in tensors
        and torch.equal(tensors["output_projection.weight"], embed))
    return RetNetConfig(
        vocab_size=arch.get("vocab_size", embed.shape[0]), d_model=d, n_layers=layers,
        n_heads=heads, value_dim=tensors["layers.0.retention.v_proj.weight"].shape[0],
        ffn_dim=tensors["layers.0.ffn.fc1.weight"].shape[0], decays="eq8",
        norm_eps=arch["layernorm_eps"], tie_embeddings=tied, norm="rms",
        head_norm="rms", ffn=f"glu-{arch['activation_fn']}",
        scale_embeddings=not arch["no_scale_embedding"])


def convert_torchscale(tensors: dict[str, Tensor], arch: dict[str, Any] | None = None
                       ) -> tuple[RetNetConfig, dict[str, Tensor]]:
    """(config, our state_dict) for a torchscale RetNetDecoder state_dict."""
    tensors = _strip_prefix(tensors)
    if "embed_tokens.weight" not in tensors or "layers.0.retention.q_proj.weight" not in tensors:
        raise ValueError("this is not a torchscale RetNetDecoder state_dict (no embed_tokens / "
                         "layers.0.retention weights)")
    config = torchscale_config(tensors, arch or {})
    _check_buffers(tensors, config)
    names = {"retention_layer_norm": "norm1", "final_layer_norm": "norm2", "ffn.fc1": "ffn.up",
             "ffn.gate": "ffn.gate", "ffn.fc2": "ffn.down"}
    out = {"embed.weight": tensors["embed_tokens.weight"],
           "norm.weight": tensors["layer_norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = tensors["output_projection.weight"]
    try:
        for i in range(config.n_layers):
            for part in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj"):
                out[f"blocks.{i}.retention.{part}.weight"] = tensors[
                    f"layers.{i}.retention.{part}.weight"]
            for theirs, ours in names.items():
                out[f"blocks.{i}.{ours}.weight"] = tensors[f"layers.{i}.{theirs}.weight"]
    except KeyError as err:
        raise ValueError(f"this torchscale state_dict has no {err.args[0]}: it is a variant "
                         "this converter does not know, or --arch does not match it") from None
    return config, {k: v.float().contiguous() for k, v in out.items()}


def _check_buffers(tensors: dict[str, Tensor], config: RetNetConfig) -> None:
    """torchscale stores its decays and rotation angles: they must be the ones we compute."""
    decay = tensors.get("retnet_rel_pos.decay")
    eq8 = log_decays(config.n_heads, "eq8", dtype=torch.float64)
    if decay is not None and not torch.allclose(decay.double(), eq8, atol=1e-6):
        raise ValueError("the checkpoint's decays are not eq. 8's; it is not a standard "
                         "torchscale RetNet")
    angle = tensors.get("retnet_rel_pos.angle")
    if angle is not None:
        k = config.key_head_dim
        ours = (10000.0 ** -torch.linspace(0, 1, k // 2)).repeat_interleave(2)
        if angle.shape != ours.shape or not torch.allclose(angle, ours, rtol=1e-5):
            raise ValueError("the checkpoint's rotation angles do not match d_model / heads = "
                             f"{k}; check decoder_retention_heads")
