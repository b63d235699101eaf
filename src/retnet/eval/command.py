"""`retnet eval`: lm-evaluation-harness tasks (through the one driver, `run_tasks`) and
whole-document perplexity of a checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retnet.device import check_device
from retnet.loading import DTYPES, check_quantization
from retnet.modules.quant import QUANTIZATIONS
from retnet.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, check_options, opt, require


@dataclass
class EvalOptions:
    """Options of `retnet eval`."""

    checkpoint: str = opt(help="run directory or checkpoint folder")
    tasks: str | None = opt(None, "lm-eval task names, comma-separated")
    include_path: str | None = opt(None, "folder of extra task YAML files (the shipped tasks "
                                   "retnet_mc, retnet_rolling, retnet_gen and python_mc are "
                                   "always available)")
    num_fewshot: int | None = opt(None, "examples in each prompt (lm-eval's default: 0)",
                                  bounds=NON_NEGATIVE)
    limit: float | None = opt(None, "documents per task, and with --perplexity validation "
                              "documents (the first ones; a fraction below 1)", bounds=POSITIVE)
    batch_size: int = opt(8, "sequences scored together", bounds=AT_LEAST_ONE)
    perplexity: str | None = opt(None, "also report document perplexity (each document whole, "
                                 "with its full context) on the validation split of DATA "
                                 "(alone, or `stdlib`: the stdlib corpus)", metavar="DATA",
                                 const="stdlib")
    output_path: str | None = opt(None, "write the results as JSON here (with --log-samples, "
                                  "also each task's samples as JSONL beside it)",
                                  aliases=("--output_path", "--out"), metavar="FILE")
    log_samples: bool = opt(False, "keep every request, response and score (needs "
                            "--output-path)", aliases=("--log_samples",))
    gen_kwargs: dict = opt(help="generation arguments of generate-until tasks, as lm-eval's "
                           "--gen_kwargs (e.g. max_gen_toks=64 temperature=0.7 do_sample=true)",
                           factory=dict, aliases=("--gen_kwargs",))
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu)")
    dtype: str = opt("float32", "the weights' dtype (the state stays float32)",
                     choices=tuple(DTYPES))
    quantization: str | None = opt(None, "int8: weight-only int8 with one scale per output "
                                   "channel, as `retnet generate` loads it",
                                   choices=QUANTIZATIONS)

    def __post_init__(self) -> None:
        check_options(self)  # types, --dtype, and every number's range
        check_quantization(self.quantization, self.dtype)
        check_device(self.device)
        if self.log_samples and not self.output_path:
            raise ValueError("--log-samples writes its samples beside --output-path: give one")
        if self.gen_kwargs and not self.tasks:
            raise ValueError("--gen-kwargs applies to --tasks; none given")
        if not self.tasks and self.perplexity is None:
            raise ValueError("nothing to do: pass --tasks and/or --perplexity")
        if self.tasks:
            require("eval", "lm_eval")


def limited(count: int, limit: float | None) -> int:
    """How many of `count` documents --limit keeps, read as lm-eval reads its own: all (None),
    that many (1 or more), or that fraction rounded up (below 1)."""
    if limit is None:
        return count
    return min(count, math.ceil(count * limit) if limit < 1 else int(limit))


def _perplexity(model, tok, data: str, limit: float | None) -> dict[str, Any]:
    from retnet.data import load_documents, split_documents
    from retnet.eval.scoring import perplexity

    _, val = split_documents(load_documents(None if data == "stdlib" else data))
    result = perplexity(model, tok, [d.text for d in val[:limited(len(val), limit)]])
    print(f"document perplexity {result['perplexity']:.3f}, bits per byte "
          f"{result['bits_per_byte']:.4f} over {result['tokens']:,} tokens (each validation "
          "document whole, from BOS with the state carried; training's window perplexity "
          "differs, see docs/implementation-notes.md)")
    return result


def _tasks(model, tok, opts: EvalOptions) -> tuple[dict[str, Any], dict[str, list]]:
    from retnet.eval.tasks import evaluate_tasks

    out = evaluate_tasks(model, tok, opts.tasks.split(","), include_path=opts.include_path,
                         num_fewshot=opts.num_fewshot, limit=opts.limit,
                         batch_size=opts.batch_size, log_samples=opts.log_samples,
                         gen_kwargs=opts.gen_kwargs or None)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    return out["results"], out.get("samples") or {}


def _write(path: Path, results: dict[str, Any], samples: dict[str, list]) -> None:
    """The results as JSON at `path`; each task's samples as `<stem>_samples_<task>.jsonl`
    beside it (lm-eval's own record of a sample: request, responses, filtered, metrics)."""
    from retnet.files import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=1, default=str))
    for task, rows in samples.items():
        lines = (json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(path.with_name(f"{path.stem}_samples_{task}.jsonl"), "".join(lines))


def command(opts: EvalOptions) -> int:
    from retnet.device import pick_device
    from retnet.loading import load

    model, tok = load(opts.checkpoint, pick_device(opts.device), opts.dtype, opts.quantization,
                      layout="inference")
    results: dict[str, Any] = {}
    samples: dict[str, list] = {}
    if opts.perplexity is not None:
        results["perplexity"] = _perplexity(model, tok, opts.perplexity, opts.limit)
    if opts.tasks:
        results["tasks"], samples = _tasks(model, tok, opts)
    if opts.output_path:
        _write(Path(opts.output_path), results, samples)
    return 0
