"""`retnet eval`: lm-evaluation-harness tasks (through the one driver, `run_tasks`) and
whole-document perplexity of a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retnet.generation.command import DTYPES, check_quantization
from retnet.modules.quant import QUANTIZATIONS
from retnet.options import opt, require, short


@dataclass
class EvalOptions:
    """Options of `retnet eval`."""

    checkpoint: str = opt(help="run directory or checkpoint folder")
    tasks: str | None = opt(None, "lm-eval task names, comma-separated")
    include_path: str | None = opt(None, "folder of extra task YAML files (the shipped tasks "
                                   "retnet_mc, retnet_rolling, retnet_gen and python_mc are "
                                   "always available)")
    num_fewshot: int | None = opt(None, "examples in each prompt (lm-eval's default: 0)")
    limit: float | None = opt(None, "documents per task (a fraction below 1)")
    batch_size: int = opt(8, "sequences scored together")
    perplexity: str | None = opt(None, "also report perplexity on the validation split of "
                                 "DATA (alone, or `stdlib`: the stdlib corpus)", metavar="DATA",
                                 const="stdlib")
    out: str | None = opt(None, "write the results as JSON here")
    dtype: str = opt("float32", "the weights' dtype (the state stays float32)",
                     choices=tuple(DTYPES))
    quantization: str | None = opt(None, "int8: weight-only int8 with one scale per output "
                                   "channel, as `retnet generate` loads it",
                                   choices=QUANTIZATIONS)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"invalid --dtype {short(self.dtype)}; use {', '.join(DTYPES)}")
        check_quantization(self.quantization, self.dtype)
        if not self.tasks and self.perplexity is None:
            raise ValueError("nothing to do: pass --tasks and/or --perplexity")
        if self.tasks:
            require("eval", "lm_eval")


def _perplexity(model, tok, data: str) -> dict[str, Any]:
    from retnet.data import load_documents, split_documents
    from retnet.eval.scoring import perplexity

    _, val = split_documents(load_documents(None if data == "stdlib" else data))
    result = perplexity(model, tok, [d.text for d in val])
    print(f"perplexity {result['perplexity']:.3f}, bits per byte "
          f"{result['bits_per_byte']:.4f} over {result['tokens']:,} tokens")
    return result


def _tasks(model, tok, opts: EvalOptions) -> dict[str, Any]:
    from retnet.eval.tasks import run_tasks

    results = run_tasks(model, tok, opts.tasks.split(","), include_path=opts.include_path,
                        num_fewshot=opts.num_fewshot, limit=opts.limit,
                        batch_size=opts.batch_size)
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    return results


def command(opts: EvalOptions) -> int:
    from retnet.loading import load

    model, tok = load(opts.checkpoint, dtype=DTYPES[opts.dtype], quantization=opts.quantization)
    results: dict[str, Any] = {}
    if opts.perplexity is not None:
        results["perplexity"] = _perplexity(model, tok, opts.perplexity)
    if opts.tasks:
        results["tasks"] = _tasks(model, tok, opts)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1, default=str))
    return 0
