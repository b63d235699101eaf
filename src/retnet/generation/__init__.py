"""Generation: a chunkwise (or parallel) prefill makes a state, then O(1) recurrent steps that
each take only the newest token. Sampling is kept apart from the loop; every row has its own
random generator, so a seeded row samples the same tokens whatever else is in its batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from retnet.model import RetNetLM, RetNetState


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be ≥ 1; got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0; got {self.repetition_penalty}")


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the top k, then outside the smallest set of tokens
    whose probability reaches top_p (the most likely token is always kept). logits [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalise_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on tokens already in the sequence; seen [B, V] bool."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample(logits: Tensor, params: SamplingParams, generators: Sequence[torch.Generator] | None,
           seen: Tensor | None = None) -> Tensor:
    """One token per row from logits [B, V]; greedy at temperature 0. Returns [B] int64."""
    logits = logits.float()
    if seen is not None:
        logits = penalise_repetition(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    cdf = logits.softmax(-1).cumsum(-1)
    # One uniform draw per row from that row's own generator (on the CPU, so any device
    # gives the same draws), then inverse-CDF sampling.
    if generators is None:
        u = torch.rand(logits.shape[0])
    else:
        u = torch.cat([torch.rand(1, generator=g) for g in generators])
    u = u.to(cdf) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None]).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def make_generators(seed: int | Sequence[int] | None, batch: int) -> list[torch.Generator] | None:
    """An int seeds every row's generator alike; a sequence gives one seed per row."""
    if seed is None:
        return None
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def prefill(model: RetNetLM, input_ids: Tensor, attention_mask: Tensor | None = None,
            state: RetNetState | None = None, *, mode: str = "chunkwise", chunk_size: int = 64
            ) -> tuple[Tensor, RetNetState]:
    """Read a prompt; return the last position's logits [B, V] and the state after it."""
    out = model(input_ids, state=state, mode=mode, chunk_size=chunk_size,
                attention_mask=attention_mask, last_only=True)
    return out.logits[:, -1], out.state


@torch.no_grad()
def decode_one(model: RetNetLM, token: Tensor, state: RetNetState,
               active: Tensor | None = None, *, out: RetNetState | None = None
               ) -> tuple[Tensor, RetNetState]:
    """One recurrent step on token [B]; rows with active=False are left untouched.

    out: optional buffers (e.g. `state.empty_like()`, or the state before last) that receive
    the new state; a loop that alternates two states allocates nothing per token."""
    mask = None if active is None else active[:, None]
    result = model(token[:, None], state=state, mode="recurrent", attention_mask=mask,
                   state_out=out)
    return result.logits[:, -1], result.state


def generate_stream(model: RetNetLM, input_ids: Tensor, max_new_tokens: int, *,
                    attention_mask: Tensor | None = None, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, eos_token_id: int | None = None,
                    pad_token_id: int | None = None, stop: Sequence[str] | None = None,
                    tokenizer=None, seed: int | Sequence[int] | None = None,
                    state: RetNetState | None = None, prefill_mode: str = "chunkwise",
                    chunk_size: int = 64) -> Iterator[tuple[Tensor, RetNetState | None]]:
    """Yield ([B] new tokens, None) per step; finally (empty, state after every token).

    Finished rows yield pad_token_id. The caller's state is never modified."""
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    B = _check(input_ids, attention_mask, stop, tokenizer)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    generators = make_generators(seed, B)
    seen = _seen_tokens(input_ids, attention_mask, model.config.vocab_size, params)
    logits, state = prefill(model, input_ids, attention_mask, state, mode=prefill_mode,
                            chunk_size=chunk_size)
    active = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    texts = [[] for _ in range(B)] if stop else None
    spare = None  # prefill made a fresh state: from here on two buffers take turns
    for _ in range(max_new_tokens):
        token = sample(logits, params, generators, seen).masked_fill(~active, pad)
        if seen is not None:
            seen[torch.arange(B), token] |= active
        yield token, None
        spare = spare if spare is not None and spare.fits(state) else state.empty_like()
        # the state consumes the token
        (logits, state), spare = decode_one(model, token, state, active, out=spare), state
        if eos_token_id is not None:
            active &= token != eos_token_id
        if texts is not None:
            active &= ~_hit_stop(token, active, texts, stop, tokenizer)
        if not active.any():
            break
    yield input_ids.new_empty(0), state


def generate(model: RetNetLM, input_ids: Tensor, max_new_tokens: int, **kwargs
             ) -> Tensor | tuple[Tensor, RetNetState]:
    """Prompt plus up to max_new_tokens new tokens, [B, T_prompt + N] (rows that stop early are
    filled with the pad id), or (tokens, state) with return_state=True; the state has consumed
    every returned token. Arguments as `generate_stream`, plus return_state."""
    return_state = kwargs.pop("return_state", False)
    pad = kwargs.get("pad_token_id")
    pad = pad if pad is not None else (kwargs.get("eos_token_id") or 0)
    steps, final = [], None
    for token, state in generate_stream(model, input_ids, max_new_tokens, **kwargs):
        if state is not None:
            final = state
        else:
            steps.append(token)
    new = (torch.stack(steps, 1) if steps
           else input_ids.new_empty(input_ids.shape[0], 0))
    if new.shape[1] < max_new_tokens:  # everyone stopped early
        fill = new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad)
        new = torch.cat([new, fill], 1)
    tokens = torch.cat([input_ids, new], 1)
    return (tokens, final) if return_state else tokens


def _check(input_ids: Tensor, attention_mask: Tensor | None, stop, tokenizer) -> int:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T ≥ 1; got {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("the last position of every row must be a real token: pad prompts "
                         "on the left")
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: pass tokenizer=...")
    return input_ids.shape[0]


def _seen_tokens(input_ids: Tensor, mask: Tensor | None, vocab: int,
                 params: SamplingParams) -> Tensor | None:
    if params.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    seen.scatter_(1, input_ids.clamp(max=vocab - 1), real)
    return seen


def _hit_stop(token: Tensor, active: Tensor, texts: list[list[int]], stop, tokenizer) -> Tensor:
    hit = torch.zeros_like(active)
    for row, tok in enumerate(token.tolist()):
        if not active[row]:
            continue
        texts[row].append(tok)
        tail = tokenizer.decode(texts[row][-64:])
        hit[row] = any(s in tail for s in stop)
    return hit
