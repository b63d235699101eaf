"""Make the torchscale test data: random-weight microsoft/torchscale RetNetDecoder models of two
small sizes, their state_dicts (safetensors), fixed inputs and reference logits.

torchscale needs timm, hence torchvision, which does not import beside the project's CPU
torch 2.13.0, so this runs once in a separate environment (both wheels lie on local disk here):

    python3 -m venv /tmp/venv-ts
    /tmp/venv-ts/bin/pip install torch==2.14.1 torchvision==0.29.1 safetensors numpy
    /tmp/venv-ts/bin/pip install torchscale==0.3.0
    /tmp/venv-ts/bin/python scripts/torchscale_reference.py tests/data/torchscale

CI then converts the saved weights with `retnet convert --from torchscale` and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchscale.architecture.config import RetNetConfig
from torchscale.architecture.retnet import RetNetDecoder

# Two sizes that exercise the variant options: untied vs tied output, gelu vs swish GLU,
# embedding scale off vs on, value width ≠ 2·d.
MODELS = {
    "ts_a": dict(decoder_embed_dim=64, decoder_value_embed_dim=128, decoder_retention_heads=2,
                 decoder_ffn_embed_dim=96, decoder_layers=2, vocab_size=300,
                 activation_fn="gelu", no_scale_embedding=True,
                 share_decoder_input_output_embed=False, layernorm_eps=1e-6),
    "ts_b": dict(decoder_embed_dim=96, decoder_value_embed_dim=144, decoder_retention_heads=3,
                 decoder_ffn_embed_dim=160, decoder_layers=3, vocab_size=300,
                 activation_fn="swish", no_scale_embedding=False,
                 share_decoder_input_output_embed=True, layernorm_eps=1e-6),
}


def build(arch: dict) -> RetNetDecoder:
    args = RetNetConfig(**arch)
    embed = torch.nn.Embedding(arch["vocab_size"], arch["decoder_embed_dim"])
    torch.nn.init.normal_(embed.weight, std=arch["decoder_embed_dim"] ** -0.5)
    model = RetNetDecoder(args, embed_tokens=embed)
    with torch.no_grad():  # norms start at 1: perturb them so the comparison means something
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, arch) in enumerate(MODELS.items()):
        torch.manual_seed(100 + i)
        model = build(arch)
        tokens = torch.randint(0, arch["vocab_size"], (2, 37))
        with torch.no_grad():
            logits, _ = model.double()(tokens)  # the parallel form, float64
        tensors = {k: v.detach().float().clone().contiguous()
                   for k, v in model.state_dict().items()}
        save_file(tensors, out / f"{name}.safetensors")
        save_file({"tokens": tokens, "logits": logits.float().contiguous()},
                  out / f"{name}.reference.safetensors")
        (out / f"{name}.json").write_text(json.dumps(arch, indent=1))
        print(f"{name}: {sum(t.numel() for t in tensors.values()):,} values, logits "
              f"{tuple(logits.shape)}, torch {torch.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/torchscale"))
