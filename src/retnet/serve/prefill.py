"""One request's prompt being read, a granted number of tokens per engine step (chunked
prefill), from its longest cached prefix, storing states at a few chosen points."""

from __future__ import annotations

import torch

from retnet.generation import prefill
from retnet.generation.scoring import Scores, score_segments
from retnet.model import RetNetLM, RetNetState
from retnet.ops import Form
from retnet.serve.cache import Entry, PrefixCache, boundaries
from retnet.serve.request import Request
from retnet.serve.scheduler import cache_points


class Prefill:
    """The prompt of `request`, read by `advance` until `done`; then `logits` [V] are the
    next-token logits and `state` the state after the whole prompt."""

    def __init__(self, model: RetNetLM, form: Form, cache: PrefixCache, request: Request
                 ) -> None:
        self.model, self.form, self.cache, self.request = model, form, cache, request
        ids = request.prompt_ids
        self.scoring = request.echo and request.logprobs is not None
        if self.scoring:  # every position's logits are needed: no cached prefix skips any
            request.prompt_logprobs = [(ids[0], None, None)]
        self.state: RetNetState | None = None
        self.logits: torch.Tensor | None = None
        if request.state_id is not None or self.scoring:  # a saved conversation goes on
            self.read, self.state, self.points = 0, request.initial_state, []
        else:
            self.read, entry = cache.longest(ids, boundaries(len(ids), request.message_ends))
            if entry is not None:
                self.state, self.logits = entry.state, entry.logits
            self.points = cache_points(len(ids), request.message_ends)
        request.cached_tokens = self.read

    @property
    def left(self) -> int:
        """Prompt tokens still to read."""
        return len(self.request.prompt_ids) - self.read

    @property
    def done(self) -> bool:
        return self.left == 0

    def advance(self, tokens: int) -> int:
        """Read up to `tokens` more prompt tokens, cut at the cache points (a state is kept
        at each); returns how many were read."""
        start = self.read
        while self.read < start + tokens and not self.done:
            end = min([start + tokens, len(self.request.prompt_ids)]
                      + [p for p in self.points if p > self.read])
            self._run(end)
            if end in self.points:
                self.cache.put(self.request.prompt_ids[:end], Entry(self.state, self.logits))
        return self.read - start

    def _run(self, end: int) -> None:
        ids, req = self.request.prompt_ids, self.request
        segment = torch.tensor([ids[self.read:end]], device=self.model.embed.weight.device)
        if self.scoring:  # each position scores the prompt token after it
            for scores, out in score_segments(self.model, segment, ids[self.read + 1:end + 1],
                                              self.state, form=self.form, top=req.logprobs):
                self.state, self.logits = out.state, out.logits[0, -1]
                req.prompt_logprobs += prompt_entries(scores)
        else:
            out, self.state = prefill(self.model, segment, state=self.state, form=self.form)
            self.logits = out[0]
        self.read = end


def prompt_entries(scores: Scores) -> list[tuple[int, float, list[tuple[int, float]] | None]]:
    """(token, its log-probability, the top alternatives or None) per scored prompt token."""
    alternatives = ([list(zip(i.tolist(), v.tolist())) for v, i in zip(*scores.top)]
                    if scores.top is not None else [None] * len(scores.logprobs))
    return list(zip(scores.targets.tolist(), scores.logprobs.tolist(), alternatives))
