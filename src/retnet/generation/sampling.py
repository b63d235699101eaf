"""Sampling, apart from the loop: the parameters, top-k / top-p filtering, CTRL's repetition
penalty, OpenAI's presence / frequency penalties and inverse-CDF draws from one random
generator per row (so a seeded row samples the same tokens whatever else is in its batch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from retnet.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range

_TOP_P = Range(0, 1, low_open=True)
_PENALTY = Range(-2, 2)  # OpenAI's range for presence and frequency penalties


@dataclass(frozen=True)
class SamplingParams:
    """How `sample` draws a token. Every number must be finite (a ValueError names the first
    that is not). temperature 0 is greedy, and so is a positive one so small that the logits
    divided by it overflow float32 (any below about 1e-38: 1e-40, 5e-324): that is the limit
    of sampling as the temperature goes to 0, where dividing would give inf and NaN."""

    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already drawn
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was drawn

    def __post_init__(self) -> None:
        NON_NEGATIVE.check("temperature", self.temperature)
        if self.top_k is not None:
            AT_LEAST_ONE.check("top_k", self.top_k, integer=True)
        if self.top_p is not None:
            _TOP_P.check("top_p", self.top_p)
        POSITIVE.check("repetition_penalty", self.repetition_penalty)
        _PENALTY.check("presence_penalty", self.presence_penalty)
        _PENALTY.check("frequency_penalty", self.frequency_penalty)

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the count of each token drawn so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


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


def penalise_counts(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: logit − frequency · count − presence · [count > 0], where counts
    [B, V] are the times each token was drawn so far (the completion's, not the prompt's)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample(logits: Tensor, params: SamplingParams, generators: Sequence[torch.Generator] | None,
           seen: Tensor | None = None, counts: Tensor | None = None) -> Tensor:
    """One token per row from logits [B, V]; greedy at temperature 0, and in a row whose
    logits / temperature overflow (see SamplingParams). Returns [B] int64.
    seen [B, V] bool: CTRL's repetition penalty; counts [B, V]: the presence / frequency ones."""
    logits = logits.float()
    if seen is not None:
        logits = penalise_repetition(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = penalise_counts(logits, counts, params.presence_penalty,
                                 params.frequency_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    scaled = logits / params.temperature
    # A tiny temperature overflows the largest logit to inf (or 0/0 to NaN), and softmax would
    # then give NaN: such a row takes its greedy token, the limit as the temperature falls.
    overflow = ~torch.isfinite(scaled.amax(-1))  # [B]
    drawn = _draw(filter_logits(scaled, params.top_k, params.top_p), generators)
    return torch.where(overflow, logits.argmax(-1), drawn)


def _draw(logits: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """Inverse-CDF draws from softmax(logits) [B, V]: one uniform per row (every row draws,
    so a seeded row's sequence of draws does not depend on the others). Returns [B]."""
    cdf = logits.softmax(-1).cumsum(-1)
    # One uniform draw per row from that row's own generator (on the CPU, so any device
    # gives the same draws), then inverse-CDF sampling.
    if generators is None:
        u = torch.rand(logits.shape[0])
    else:
        u = torch.cat([torch.rand(1, generator=g) for g in generators])
    u = u.to(cdf) * cdf[:, -1]
    # Token i owns [cdf[i-1], cdf[i]): "right" finds the first cdf[i] > u, so a draw of
    # exactly 0 never picks a leading token of probability 0 (a filtered one).
    return torch.searchsorted(cdf, u[:, None], side="right").squeeze(-1).clamp(
        max=logits.shape[-1] - 1)


def make_generators(seed: int | Sequence[int] | None, batch: int) -> list[torch.Generator] | None:
    """An int seeds every row's generator alike; a sequence gives one seed per row."""
    if seed is None:
        return None
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
