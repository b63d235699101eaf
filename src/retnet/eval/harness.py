"""lm-evaluation-harness model "retnet" (the `[eval]` extra). Importing this module registers
it with lm-eval (a documented side effect, like `retnet.hf`'s Auto classes); only the code that
drives lm-eval imports it (`retnet.eval.run_tasks`, used by `retnet eval` and `retnet compare`).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

# lm-eval's own models before ours: it imports them only while its registry is empty, so
# registering "retnet" first would hide `hf` and `local-completions` in the same process.
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from retnet.device import pick_device
from retnet.eval.scoring import continuation_logprobs, document_logprob, generate_until
from retnet.model import RetNetLM
from retnet.tokenizer import Tokenizer


def quiet_git_hash() -> str | None:
    """lm-eval's record of the working directory's git commit, without the `fatal: not a git
    repository` that its own `get_git_commit_hash` lets git print outside a clone."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):  # not a clone; no git
        return get_commit_from_path(os.getcwd())


def quiet_git() -> None:
    """Make lm-eval's evaluator record the commit with `quiet_git_hash` (called by the two
    drivers of lm-eval, never at import)."""
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash


@register_model("retnet")
class RetNetHarnessLM(LM):
    """loglikelihood / loglikelihood_rolling / generate_until over the one RetNetLM."""

    def __init__(self, checkpoint: str | None = None, model: RetNetLM | None = None,
                 tokenizer: Tokenizer | None = None, batch_size: int | str = 8,
                 max_length: int = 2048, device: str | None = None,
                 dtype: str | None = None, pretrained: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        checkpoint = checkpoint or pretrained  # lm-eval's name for it (`--model hf`)
        handed_over = model is not None
        if model is None:
            if checkpoint is None:
                raise ValueError("pass checkpoint=DIR (a run directory or checkpoint folder)")
            from retnet.loading import load

            model, tokenizer = load(checkpoint)
        if tokenizer is None:
            raise ValueError("a model needs its tokenizer")
        if device is None and handed_over:
            device = next(model.parameters()).device  # a model handed over stays where it is
        device = pick_device(device)
        model = model.to(device) if dtype is None else model.to(device, getattr(torch, dtype))
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size_per_call = int(batch_size)
        self.max_length = int(max_length)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Whitespace that ends the context belongs to the continuation (harness convention).
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        cont = whole[len(ctx):] or self.tok.encode(continuation)
        ctx = ctx or [self.tok.eos_id]
        budget = self.max_length + 1 - len(cont)
        return ctx[-max(budget, 1):], cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        out = []
        step = self.batch_size_per_call * 16
        for start in tqdm(range(0, len(pairs), step), disable=disable_tqdm, desc="loglikelihood"):
            out += continuation_logprobs(self.model, pairs[start:start + step],
                                         self.batch_size_per_call, self.tok.pad_id)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole document as context (RetNet needs no sliding windows)."""
        return [document_logprob(self.model, self.tok.encode(r.args[0]), self.tok.eos_id)
                for r in tqdm(requests, disable=disable_tqdm, desc="rolling")]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            out.append(generate_until(self.model, self.tok, context, until,
                                      int(kwargs.get("max_gen_toks", 256)), temperature))
        return out
