"""What the inference weight formats cost in quality, on a trained checkpoint: for float32,
bf16 and weight-only int8 weights, the validation perplexity as `retnet eval --perplexity`
computes it (chunkwise, whole documents), and the logits of the one-token decode path (the
fused kernel where it runs) under teacher forcing against float32's: the relative error of
every step's logits, the largest KL divergence of a step, the agreement of the argmax, and the
perplexity of the decoded tokens.

    python benchmarks/quality.py --checkpoint runs/demo
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from retnet.generation import StepBuffers, prefill
from retnet.model import RetNetLM
from retnet.model.fast_decode import decode_path

FORMATS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
           "int8": (torch.float32, "int8")}


def load_format(checkpoint: str, name: str) -> RetNetLM:
    """The checkpoint's model in format `name`, laid out as `retnet generate` decodes it."""
    from retnet.loading import load

    dtype, quantization = FORMATS[name]
    return load(checkpoint, dtype=dtype, quantization=quantization, layout="inference")[0]


@torch.no_grad()
def teacher_forced_logits(model: RetNetLM, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [T - 1, vocab] of one-token steps over ids [T] (the first token only
    prefilled), each step fed the true next token."""
    logits, state = prefill(model, ids[None, :1])
    steps, buffers = [logits.float()], StepBuffers()
    for t in range(1, ids.shape[0] - 1):
        logits, state = buffers.step(model, ids[None, t], state)
        steps.append(logits.float())
    return torch.cat(steps)


def compare(steps: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict:
    """One format's decoded logits [N, vocab] against float32's, and its perplexity."""
    logp, ref_logp = steps.log_softmax(-1), reference.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    nll = -logp.gather(1, targets[:, None]).mean().item()
    return {"logits_rel_error": ((steps - reference).norm() / reference.norm()).item(),
            "max_step_kl": kl.max().item(), "argmax_agreement":
                (steps.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "decoded_perplexity": math.exp(nll)}


def run(checkpoint: str, decode_tokens: int, formats: Sequence[str] = tuple(FORMATS)) -> dict:
    """Every format's validation perplexity and teacher-forced decode, against float32."""
    from tqdm import tqdm

    from retnet.data import load_documents, split_documents
    from retnet.eval.scoring import perplexity
    from retnet.loading import load

    _, tok = load(checkpoint)
    _, val = split_documents(load_documents(None))
    texts = [d.text for d in val]
    ids = torch.tensor([t for text in texts for t in [tok.eos_id, *tok.encode(text)]]
                       [:decode_tokens + 1])
    results, reference = {}, None
    with tqdm(total=2 * len(formats), desc="quality", unit="pass") as bar:
        for name in formats:
            bar.set_postfix_str(f"{name} perplexity")
            model = load_format(checkpoint, name)
            entry = {"decode_path": decode_path(model), **perplexity(model, tok, texts)}
            bar.update(1)
            bar.set_postfix_str(f"{name} decode")
            steps = teacher_forced_logits(model, ids)
            bar.update(1)
            reference = steps if reference is None else reference
            entry.update(compare(steps, reference, ids[1:]))
            results[name] = entry
    base = results[formats[0]]["perplexity"]
    for entry in results.values():
        entry["perplexity_vs_float32"] = entry["perplexity"] / base - 1
    return results


def lines(results: dict, decode_tokens: int) -> list[str]:
    from retnet.bench.measure import table

    rows = [(name, f"{r['perplexity']:.4f}", f"{100 * r['perplexity_vs_float32']:+.3f}%",
             f"{r['decoded_perplexity']:.4f}", f"{r['logits_rel_error']:.2e}",
             f"{r['max_step_kl']:.2e}", f"{100 * r['argmax_agreement']:.2f}%")
            for name, r in results.items()]
    return table(["weights", "validation perplexity", "vs float32",
                  f"decoded perplexity ({decode_tokens} tokens)", "logits rel. error",
                  "max KL of a step", "argmax = float32's"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    from retnet.bench.machine import header
    from retnet.bench.measure import script_parser, write_results

    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--decode-tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    results = run(args.checkpoint, args.decode_tokens)
    write_results(args.out, "quality", results,
                  [header(f"checkpoint {args.checkpoint}"), "",
                   *lines(results, args.decode_tokens)])
