"""From each step's logits to what clients hear: a token sampled per row with the request's
own generator and penalties, its text released by the row's TextStream as an Event, and the
row finished at the end of text, a stop string or max_tokens (its last event carrying the text
held back, and the id of its saved state when the request asked for one)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import torch

from retnet.generation import decode_one, sample
from retnet.generation.scoring import log_probs
from retnet.model import RetNetLM
from retnet.serve.batch import Batch
from retnet.serve.cache import StateStore
from retnet.serve.counters import Counters
from retnet.serve.request import ABORT, Event, Request, Row, RowStatus
from retnet.tokenizer import Tokenizer


class Emitter:
    """close(request, last event): the engine's end of a request (it counts those in flight)."""

    def __init__(self, model: RetNetLM, tokenizer: Tokenizer, saved: StateStore,
                 counters: Counters, close: Callable[[Request, Event], None]) -> None:
        self.model, self.tok, self.saved, self.counters = model, tokenizer, saved, counters
        self.close = close
        self.state_nbytes = model.init_state(1).nbytes  # what one saved state costs

    def emit(self, batch: Batch, rows: list[Row], logits: torch.Tensor) -> None:
        """One token for each of `rows` (rows of `batch`) from its logits [len(rows), V]."""
        logprobs = log_probs(logits)
        for row, row_logits, row_lp in zip(rows, logits, logprobs):
            token = self._sample(row, row_logits)
            req = row.request
            self.counters.generated_tokens += 1
            req.completion_tokens += 1
            top = None
            if req.logprobs:
                values, idx = row_lp.topk(req.logprobs)
                top = list(zip(idx.tolist(), values.tolist()))
            if token == self.tok.eos_id and not req.ignore_eos:
                self.finish(batch, row, "stop")
                continue
            text = row.text.push(token)
            req.emit(Event(row.index, text, token, float(row_lp[token]), top))
            if row.text.stopped:
                self.finish(batch, row, "stop")
            elif len(row.text.ids) >= req.max_tokens:
                self.finish(batch, row, "length")

    def _sample(self, row: Row, logits: torch.Tensor) -> int:
        """The row's next token from its logits [V]; it becomes the row's newest."""
        req = row.request
        if req.params.counts_tokens and row.counts is None:
            row.counts = logits.new_zeros(1, logits.shape[-1], dtype=torch.float32)
        token = int(sample(logits[None], req.params, [row.generator], counts=row.counts)[0])
        if row.counts is not None:
            row.counts[0, token] += 1
        row.last = token
        return token

    def finish(self, batch: Batch, row: Row, reason: str) -> None:
        """End a row: its last event carries the text held back (none after a stop string);
        the request's usage event follows its last row's."""
        req = row.request
        req.open_rows -= 1
        if reason != "cancelled":
            rest = row.text.finish()
            save = (req.save_state and row.index == 0 and reason != ABORT
                    and self.saved.fits(self.state_nbytes))
            state_id = self._save(batch, row) if save else None
            req.emit(Event(row.index, rest, finish_reason=reason, state_id=state_id))
        row.status = RowStatus.FINISHED  # it leaves the batch after this step
        if req.open_rows == 0:
            self.close(req, Event(-1, usage={"prompt_tokens": len(req.prompt_ids),
                                             "completion_tokens": req.completion_tokens,
                                             "cached_tokens": req.cached_tokens}))

    def _save(self, batch: Batch, row: Row) -> str:
        """The state after every token of this row, kept under a new id (the store evicts
        the least recently used beyond its bytes)."""
        state = batch.state_of(row)
        _, state = decode_one(self.model, torch.tensor([row.last], device=state.device), state)
        key = uuid.uuid4().hex
        self.saved.put(key, state)
        return key
