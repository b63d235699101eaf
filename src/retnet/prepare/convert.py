"""`retnet convert --from torchscale CKPT OUT`: torchscale weights (`retnet.convert`) written
as one of our runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from retnet.convert import convert_torchscale, load_tensors, read_arch
from retnet.options import opt


@dataclass
class ConvertOptions:
    """Options of `retnet convert`."""

    checkpoint: str = opt(help="torchscale state_dict (.pt, weights only) or .safetensors",
                          positional=True, metavar="CKPT")
    out: str = opt(help="run directory to write (retnet generate / serve it)", positional=True,
                   metavar="OUT")
    source: str = opt("torchscale", "the implementation that wrote CKPT", aliases=("--from",),
                      choices=("torchscale",))
    arch: str | None = opt(None, "torchscale's RetNetConfig arguments, as a JSON file or inline "
                           "JSON; activation_fn, layernorm_eps and no_scale_embedding are "
                           "required (the weights do not record them); shapes give the rest")
    tokenizer: str = opt("byte", "the model's tokenizer.json")


def command(opts: ConvertOptions) -> int:
    convert_command(opts.source, opts.checkpoint, opts.out, opts.arch, opts.tokenizer)
    return 0


def convert_command(source: str, checkpoint: str, out: str, arch_source: str | None,
                    tokenizer: str = "byte") -> Path:
    """`retnet convert --from torchscale CKPT OUT`: write one of our checkpoints."""
    from retnet.checkpoint import save_checkpoint
    from retnet.model import RetNetLM
    from retnet.tokenizer import load_tokenizer

    if source != "torchscale":
        raise ValueError(f"unknown source {source!r}; supported: torchscale")
    config, weights = convert_torchscale(load_tensors(checkpoint), read_arch(arch_source))
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{config.vocab_size}; pass the model's own --tokenizer")
    model = RetNetLM(config)
    model.load_state_dict(weights)  # strict: every tensor placed, none left over
    params = sum(v.numel() for v in weights.values())
    path = save_checkpoint(out, 0, model.state_dict(), config, tok,
                           {"optimizer": {}, "step": 0, "rng": {}},
                           {"converted_from": f"torchscale:{Path(checkpoint).name}",
                            "parameters": params})
    print(f"converted {params:,} parameters ({math.ceil(params * 4 / 2**20)} MiB) -> {path}")
    return path
