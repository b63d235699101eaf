"""The serving engine: one thread, one loop over every active sequence (continuous batching).
Each turn of the loop runs one decode step of the batch (`batch`), turns its logits into
tokens and events (`emit`), then reads a bounded number of prompt tokens (chunked prefill,
`prefill`) split across the prompts waiting to join, reusing cached prefix states; a prompt
read whole joins the batch, finished or cancelled rows leave at once. Which requests join, and
how the prompt tokens are shared, is decided in `scheduler`."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import NamedTuple

import torch

from retnet.generation import TextStream
from retnet.model import RetNetLM, RetNetState
from retnet.ops import CHUNKWISE, Form
from retnet.serve.batch import Batch
from retnet.serve.cache import PrefixCache, StateStore
from retnet.serve.counters import Counters
from retnet.serve.emit import Emitter
from retnet.serve.prefill import Prefill
from retnet.serve.request import ABORT, Busy, Draining, Event, Request, Row
from retnet.serve.scheduler import Waiting, pick, split_budget
from retnet.tokenizer import Tokenizer

__all__ = ["ABORT", "Busy", "Draining", "Engine", "Event", "Request", "Row", "Turn"]


class Turn(NamedTuple):
    """What one turn of the engine's loop did (`Engine.turns` keeps the latest)."""

    decoded: int  # rows in its decode step (0: none ran)
    read: tuple[tuple[int, int], ...]  # (id of the request, prompt tokens read) per prompt


class Engine:
    """form: the retention form prompts are prefilled in (decoding is always recurrent).
    prefill_tokens: prompt tokens read per loop turn, all waiting prompts together (between
    two decode steps). request_rows: rows one HTTP request may hold (default: half the
    batch), so that one client never fills it. state_bytes: bound of the saved states."""

    def __init__(self, model: RetNetLM, tokenizer: Tokenizer, *, max_batch: int = 32,
                 max_queue: int = 64, cache_bytes: int = 1 << 30, state_bytes: int = 1 << 30,
                 prefill_tokens: int = 256, request_rows: int | None = None,
                 form: Form = CHUNKWISE) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.form = max_batch, max_queue, form
        self.prefill_tokens = prefill_tokens
        self.request_rows = request_rows or max(1, max_batch // 2)
        self.cache = PrefixCache(cache_bytes)
        self.saved = StateStore(state_bytes)
        self._waiting: list[Request] = []  # submitted, not yet admitted (under _lock)
        self._prefilling: list[Prefill] = []  # admitted, their prompts being read
        self.batch = Batch()  # the rows being decoded
        self.counters = Counters()
        self.emitter = Emitter(model, tokenizer, self.saved, self.counters, self._close)
        self.state_nbytes = self.emitter.state_nbytes  # what one saved state costs
        self.turns: deque[Turn] = deque(maxlen=256)  # the latest loop turns, for inspection
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()  # end every request now, each with a final event
        self._drained = threading.Event()
        # Requests submitted and not yet closed: counted under a lock, since in the engine
        # thread a request passes between the waiting list, the prefills and the rows, and a
        # reader of those lists from another thread can catch it in none of them.
        self._lock = threading.Lock()
        self._in_flight = 0
        self.accepting = True
        self._thread = threading.Thread(target=self._loop, name="retnet-engine", daemon=True)
        self._thread.start()

    # ---- called from the HTTP side -------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; KeyError if its state_id is unknown (or was just evicted)."""
        if request.state_id is not None:
            # Taken now: an eviction between this and the prefill cannot lose it.
            request.initial_state = self.saved.get(request.state_id)
            if request.initial_state is None:
                raise KeyError(request.state_id)
        with self._lock:  # atomic with drain's refusal: no request slips in after it
            if not self.accepting:
                raise Draining("the server is draining (shutting down)")
            if len(self._waiting) >= self.max_queue:
                self.counters.rejected += 1
                raise Busy("too many requests in flight")
            self._waiting.append(request)
            self._in_flight += 1
        self.counters.requests += 1
        self._wake.set()

    def snapshot(self) -> dict:
        """The counters, and what the engine holds now."""
        return self.counters.snapshot() | {
            "active_sequences": len(self.batch), "queued_requests": len(self._waiting),
            "prefilling_requests": len(self._prefilling),
            "prefix_cache_entries": len(self.cache), "prefix_cache_bytes": self.cache.nbytes,
            "saved_states": len(self.saved), "saved_state_bytes": self.saved.nbytes,
            "saved_states_evicted": self.saved.evicted}

    def busy(self) -> bool:
        """Whether any submitted request has not yet had its last event."""
        with self._lock:
            return self._in_flight > 0

    def drain(self, drain_s: float = 10.0) -> None:
        """Stop accepting; give in-flight requests drain_s to finish, then end the rest, each
        choice with finish_reason "abort" and each request with its usage event. Returns at
        once if a drain already finished; at most drain_s + 5 s otherwise."""
        if self._drained.is_set():
            return
        with self._lock:
            self.accepting = False
        deadline = time.monotonic() + drain_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.busy() and self._thread.is_alive():
            self._abort.set()
            self._wake.set()
            deadline = time.monotonic() + 5  # one engine step, at most one prefill segment
            while self.busy() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._drained.set()

    def shutdown(self, drain_s: float = 10.0) -> None:
        """Drain (see `drain`), then stop the engine thread."""
        self.drain(drain_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                if self._abort.is_set():
                    self._abort_all()
                self._drop_cancelled()
                self._admit()
                if self.batch.rows or self._prefilling:
                    decoded = self._step() if self.batch.rows else 0
                    self.turns.append(Turn(decoded, self._read_prompts()))
                else:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
            for row in self.batch.decoding():
                self.emitter.finish(self.batch, row, "cancelled")
            self.batch.clear()

    def _abort_all(self) -> None:
        """End every request now (the drain window is over): a last event per choice, then
        the usage event, so that each client sees a proper end."""
        for row in self.batch.decoding():
            self.emitter.finish(self.batch, row, ABORT)
        self.batch.remove_finished()
        with self._lock:
            waiting = [p.request for p in self._prefilling] + self._waiting
            self._prefilling, self._waiting = [], []
        for request in waiting:
            for i in range(request.n):
                request.emit(Event(i, finish_reason=ABORT))
            self._close(request, Event(-1, usage={"prompt_tokens": len(request.prompt_ids),
                                                  "completion_tokens": 0, "cached_tokens": 0}))

    def _close(self, request: Request, last: Event | None = None) -> None:
        """Emit a request's last event (none when its client is gone); it leaves the count
        that `busy` reads. Only the first call counts."""
        if request.closed:
            return
        request.closed = True
        if last is not None:
            request.emit(last)
        with self._lock:
            self._in_flight -= 1

    def _fail(self, request: Request, err: Exception) -> None:
        self._close(request, Event(index=-1, finish_reason="error", usage={"error": str(err)}))

    def _held(self) -> dict[object, int]:
        """Rows each HTTP request holds: decoding, or about to (its prompt being read)."""
        held: dict[object, int] = {}
        for row in self.batch.rows:
            held[_group(row.request)] = held.get(_group(row.request), 0) + 1
        for p in self._prefilling:
            held[_group(p.request)] = held.get(_group(p.request), 0) + p.request.n
        return held

    def _admit(self) -> None:
        """Move waiting requests to the prefills while `scheduler.pick` chooses one."""
        while True:
            with self._lock:
                waiting = [Waiting(_group(r), r.n) for r in self._waiting]
                i = pick(waiting, self._held(), self.max_batch, self.request_rows)
                if i is None:
                    return
                request = self._waiting.pop(i)
            self._guarded(request, self._begin, request)

    def _begin(self, request: Request) -> None:
        p = Prefill(self.model, self.form, self.cache, request)
        self.counters.prompt_tokens += len(request.prompt_ids)
        self.counters.cached_tokens += request.cached_tokens
        self._prefilling.append(p)

    def _read_prompts(self) -> tuple[tuple[int, int], ...]:
        """Read this turn's budget of prompt tokens, split across the prompts being read; a
        prompt read whole joins the batch. Returns (id of the request, tokens) per prompt."""
        grants = split_budget([p.left for p in self._prefilling], self.prefill_tokens)
        read = []
        for p, grant in zip(list(self._prefilling), grants):
            try:
                n = p.advance(grant)
            except Exception as err:  # a failure in one request must not stop the server
                self._prefilling.remove(p)
                self._fail(p.request, err)
                continue
            self.counters.prefilled_tokens += n
            read.append((id(p.request), n))
            if p.done:
                self._prefilling.remove(p)
                self._guarded(p.request, self._start, p.request, p.logits, p.state)
        return tuple(read)

    def _guarded(self, request: Request, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:
            self._fail(request, err)

    def _start(self, request: Request, logits: torch.Tensor, state: RetNetState) -> None:
        """A prompt read whole: its n rows join the batch with its state and sample their
        first tokens from its logits [V]."""
        self.counters.first_token(time.perf_counter() - request.arrived)
        request.open_rows = request.n
        rows = [Row(request, i, _generator(request, i), last=-1,
                    text=TextStream(self.tok, request.stop)) for i in range(request.n)]
        self.batch.join(rows, [state] * request.n)
        self.emitter.emit(self.batch, rows, logits[None].expand(request.n, -1))
        self.batch.remove_finished()

    def _step(self) -> int:
        """One decode step of every row; returns the rows it decoded."""
        start, b = time.perf_counter(), len(self.batch)
        logits = self.batch.step(self.model)
        self.emitter.emit(self.batch, self.batch.rows, logits)
        self.batch.remove_finished()
        self.counters.decode_step(b, time.perf_counter() - start)
        return b

    def _drop_cancelled(self) -> None:
        """Rows, prompts being read and waiting requests whose client is gone leave now."""
        for row in self.batch.decoding():
            if row.request.cancelled.is_set():
                self.emitter.finish(self.batch, row, "cancelled")
        self.batch.remove_finished()
        gone = [p for p in self._prefilling if p.request.cancelled.is_set()]
        with self._lock:
            gone_waiting = [r for r in self._waiting if r.cancelled.is_set()]
            self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
        for p in gone:
            self._prefilling.remove(p)
        for request in [p.request for p in gone] + gone_waiting:
            self._close(request)


def _generator(request: Request, choice: int) -> torch.Generator:
    """Choice i of a seeded request draws from seed + i; an unseeded one from a random seed."""
    seed = request.seed + choice if request.seed is not None else None
    return torch.Generator().manual_seed(seed if seed is not None
                                         else int(torch.randint(2**62, ())))


def _group(request: Request) -> object:
    """The unit of fair shares: the HTTP request (its prompts share a group)."""
    return request.group if request.group is not None else id(request)
