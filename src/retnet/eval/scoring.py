"""Evaluation: log-likelihoods of continuations, whole-document perplexity and generation, with
padding that changes nothing (so scores do not depend on batch size or order). The
lm-evaluation-harness adapter in `retnet.eval.harness` is a thin layer over these functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from retnet.generation import TextStream, generate_stream
from retnet.generation.scoring import score_segments, score_tokens
from retnet.model import RetNetLM
from retnet.ops import CHUNKWISE, Form
from retnet.tokenizer import Tokenizer


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_logprobs(model: RetNetLM, pairs: Sequence[tuple[list[int], list[int]]],
                          batch_size: int = 8, pad_id: int = 0, form: Form = CHUNKWISE
                          ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): log P(continuation | context) and whether the
    continuation is the greedy choice at every position. Requests are sorted by length and
    left-padded in batches; results come back in the input order."""
    device = model.embed.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]
        ids, mask = _left_pad(rows, pad_id, device)
        logits = model(ids, attention_mask=mask, mode=form).logits
        for row, i in enumerate(idx):
            cont = pairs[i][1]
            scores = score_tokens(logits[row, -len(cont):], cont)  # positions predicting it
            results[i] = (scores.logprobs.sum().item(), bool(scores.greedy.all()))
    return results


@torch.no_grad()
def document_logprob(model: RetNetLM, ids: list[int], bos_id: int, segment: int = 4096,
                     form: Form = CHUNKWISE) -> float:
    """log P(document) with the whole document as context (the first token conditioned on
    bos_id), read in segments that carry the state: exact, at linear cost."""
    tokens = [bos_id, *ids]
    inputs = torch.tensor([tokens[:-1]], device=model.embed.weight.device)
    return sum(scores.logprobs.sum().item() for scores, _ in
               score_segments(model, inputs, tokens[1:], form=form, segment=segment))


def perplexity(model: RetNetLM, tokenizer: Tokenizer, texts: Sequence[str],
               form: Form = CHUNKWISE) -> dict[str, float]:
    """Token perplexity and bits per byte of texts, each read as one whole document from BOS
    with the state carried (see docs/implementation-notes.md: not training's validation loss),
    under a progress bar over the texts' bytes."""
    from tqdm import tqdm

    logprob, tokens, nbytes = 0.0, 0, 0
    sizes = [len(text.encode("utf-8")) for text in texts]
    with tqdm(total=sum(sizes), desc="perplexity", unit="B", unit_scale=True,
              dynamic_ncols=True, disable=len(texts) < 2) as bar:
        for text, size in zip(texts, sizes):
            ids = tokenizer.encode(text)
            if ids:
                logprob += document_logprob(model, ids, tokenizer.eos_id, form=form)
                tokens, nbytes = tokens + len(ids), nbytes + size
                bar.set_postfix(ppl=f"{math.exp(-logprob / tokens):.2f}", refresh=False)
            bar.update(size)
    if tokens == 0:
        raise ValueError("no text to evaluate")
    return {"tokens": tokens, "bytes": nbytes, "nll_per_token": -logprob / tokens,
            "perplexity": math.exp(-logprob / tokens),
            "bits_per_byte": -logprob / nbytes / math.log(2)}


def generate_until(model: RetNetLM, tokenizer: Tokenizer, context: str, until: Sequence[str],
                   max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                   form: Form = CHUNKWISE) -> str:
    """Continue context (prefilled in `form`) until the earliest stop string (excluded), the
    end of text token or max_new_tokens."""
    ids = tokenizer.encode(context) or [tokenizer.eos_id]
    device = model.embed.weight.device
    text = TextStream(tokenizer, [s for s in until if s])
    parts = []
    for token, _ in generate_stream(model, torch.tensor([ids], device=device),
                                    max_new_tokens, temperature=temperature, seed=seed,
                                    eos_token_id=tokenizer.eos_id, prefill_form=form):
        if int(token[0]) == tokenizer.eos_id:
            break
        parts.append(text.push(int(token[0])))
        if text.stopped:
            break
    return "".join(parts) + text.finish()
