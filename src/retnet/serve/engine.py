"""The serving engine: one thread, one decode loop over every active sequence (continuous
batching). New requests are prefilled (in the engine's form, chunkwise by default, reusing
cached prefix states) between steps and join the batch; finished or cancelled ones leave at
once.

Every sequence is a row of one batched RetNetState, so the whole batch costs the same per
step whatever the lengths of the contexts."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Generator, Iterator

import torch

from retnet.generation import StepBuffers, TextStream, decode_one, prefill, sample
from retnet.model import RetNetLM, RetNetState
from retnet.ops import CHUNKWISE, Form
from retnet.serve.cache import Entry, PrefixCache, boundaries
from retnet.serve.request import ABORT, Busy, Draining, Event, Request, Row
from retnet.tokenizer import Tokenizer

__all__ = ["ABORT", "Busy", "Draining", "Engine", "Event", "Request", "Row"]


class Engine:
    """form: the retention form prompts are prefilled in (decoding is always recurrent)."""

    def __init__(self, model: RetNetLM, tokenizer: Tokenizer, *, max_batch: int = 32,
                 max_queue: int = 64, cache_bytes: int = 1 << 30, form: Form = CHUNKWISE
                 ) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.form = max_batch, form
        self.cache = PrefixCache(cache_bytes)
        self.saved: OrderedDict[str, RetNetState] = OrderedDict()
        self.saved_limit = 256
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._rows: list[Row] = []
        # Requests being prefilled, one segment (≤ 256 tokens) per loop turn, so that a long
        # prompt never stalls the streams already decoding for more than one segment.
        self._prefilling: list[tuple[Request, Iterator[None]]] = []
        self._state: RetNetState | None = None  # one row per Row, made by cat and select
        self._buffers = StepBuffers()  # the decode step's output buffers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()  # end every request now, each with a final event
        self._drained = threading.Event()
        # Requests submitted and not yet closed: counted under a lock, since in the engine
        # thread a request passes between the queue, the prefill list and the rows, and a
        # reader of those lists from another thread can catch it in none of them.
        self._lock = threading.Lock()
        self._in_flight = 0
        self.accepting = True
        self.metrics = {"requests": 0, "rejected": 0, "prompt_tokens": 0, "cached_tokens": 0,
                        "prefilled_tokens": 0, "generated_tokens": 0, "decode_steps": 0,
                        "batch_size_last": 0, "batch_size_max": 0, "batch_size_sum": 0,
                        "ttft_s_sum": 0.0, "ttft_count": 0, "step_s_sum": 0.0}
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
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                self.metrics["rejected"] += 1
                raise Busy("too many requests in flight") from None
            self._in_flight += 1
        self.metrics["requests"] += 1
        self._wake.set()

    def snapshot(self) -> dict:
        m = dict(self.metrics)
        steps = max(m["decode_steps"], 1)
        m |= {"active_sequences": len(self._rows), "queued_requests": self._queue.qsize(),
              "prefilling_requests": len(self._prefilling),
              "batch_size_mean": m["batch_size_sum"] / steps,
              "step_ms_mean": 1e3 * m["step_s_sum"] / steps,
              "ttft_ms_mean": 1e3 * m["ttft_s_sum"] / max(m["ttft_count"], 1),
              "prefix_cache_entries": len(self.cache), "prefix_cache_bytes": self.cache.nbytes,
              "saved_states": len(self.saved)}
        return m

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
                if self._rows:
                    self._step()
                elif not self._prefilling:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
            for row in self._rows:
                self._finish(row, "cancelled")
            self._rows, self._state = [], None

    def _abort_all(self) -> None:
        """End every request now (the drain window is over): a last event per choice, then
        the usage event, so that each client sees a proper end."""
        for row in self._rows:
            if row.index >= 0:
                self._finish(row, ABORT)
        self._remove_finished()
        waiting = [r for r, _ in self._prefilling]
        self._prefilling = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
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

    def _admit(self) -> None:
        """Take queued requests while slots are free; advance the oldest prefill one segment."""
        while len(self._rows) + sum(r.n for r, _ in self._prefilling) < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                self._close(request)
            else:
                self._prefilling.append((request, self._prefill(request)))
        if not self._prefilling:
            return
        request, segments = self._prefilling[0]
        try:
            if request.cancelled.is_set():
                self._prefilling.pop(0)
                self._close(request)
            else:
                next(segments)
        except StopIteration as done:
            self._prefilling.pop(0)
            self._guarded(request, self._start, request, *done.value)
        except Exception as err:  # a failure in one request must not stop the server
            self._prefilling.pop(0)
            self._fail(request, err)

    def _guarded(self, request: Request, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:
            self._fail(request, err)

    def _start(self, request: Request, logits: torch.Tensor, state: RetNetState) -> None:
        self.metrics["ttft_s_sum"] += time.perf_counter() - request.arrived
        self.metrics["ttft_count"] += 1
        request.open_rows = request.n
        new_rows = []
        for i in range(request.n):
            seed = request.seed + i if request.seed is not None else None
            gen = torch.Generator().manual_seed(seed if seed is not None
                                                else int(torch.randint(2**62, ())))
            row = Row(request, i, gen, last=-1, text=TextStream(self.tok, request.stop))
            new_rows.append(row)
        states = [state] * request.n
        self._state = RetNetState.cat(([self._state] if self._state else []) + states)
        self._rows += new_rows
        logits = logits[None].expand(request.n, -1)
        self._emit_tokens(new_rows, logits)
        self._remove_finished()

    def _prefill(self, request: Request) -> Generator[None, None, tuple[torch.Tensor, RetNetState]]:
        """Prefill segment by segment (yielding after each), reusing and filling the prefix
        cache; returns the next-token logits [V] and the state after the prompt."""
        ids = request.prompt_ids
        device = self.model.embed.weight.device
        self.metrics["prompt_tokens"] += len(ids)
        points = boundaries(len(ids), request.message_ends)
        scoring = request.echo and request.logprobs is not None
        if scoring:  # every position's logits are needed: no cached prefix skips any
            request.prompt_logprobs = [(ids[0], None, None)]
        if request.state_id is not None or scoring:  # a saved conversation continues its state
            done, state, logits, cache = 0, request.initial_state, None, False
        else:
            done, entry = self.cache.longest(ids, points)
            state = entry.state if entry else None
            logits = entry.logits if entry else None
            cache = True
        request.cached_tokens = done
        self.metrics["cached_tokens"] += done
        for end in points:
            if end <= done:
                continue
            segment = torch.tensor([ids[done:end]], device=device)
            if scoring:
                out = self.model(segment, state=state, mode=self.form)
                state, logits = out.state, out.logits[0, -1]
                request.prompt_logprobs += _prompt_logprobs(out.logits[0], ids[done + 1:end + 1],
                                                            request.logprobs)
            else:
                out, state = prefill(self.model, segment, state=state, form=self.form)
                logits = out[0]
            self.metrics["prefilled_tokens"] += end - done
            if cache:
                self.cache.put(ids[:end], Entry(state, logits))
            done = end
            if done < len(ids):
                yield
        return logits, state

    def _step(self) -> None:
        start = time.perf_counter()
        tokens = torch.tensor([r.last for r in self._rows], device=self._state.device)
        logits, self._state = self._buffers.step(self.model, tokens, self._state)
        self._emit_tokens(self._rows, logits)
        self._remove_finished()
        m, b = self.metrics, len(tokens)
        m["decode_steps"] += 1
        m["batch_size_last"], m["batch_size_sum"] = b, m["batch_size_sum"] + b
        m["batch_size_max"] = max(m["batch_size_max"], b)
        m["step_s_sum"] += time.perf_counter() - start

    def _emit_tokens(self, rows: list[Row], logits: torch.Tensor) -> None:
        logprobs = _log_softmax(logits)
        for row, row_logits, row_lp in zip(rows, logits, logprobs):
            req = row.request
            if req.params.counts_tokens and row.counts is None:
                row.counts = row_logits.new_zeros(1, row_logits.shape[-1], dtype=torch.float32)
            token = int(sample(row_logits[None], req.params, [row.generator],
                               counts=row.counts)[0])
            if row.counts is not None:
                row.counts[0, token] += 1
            row.last = token
            self.metrics["generated_tokens"] += 1
            req.completion_tokens += 1
            top = None
            if req.logprobs:
                values, idx = row_lp.topk(req.logprobs)
                top = list(zip(idx.tolist(), values.tolist()))
            if token == self.tok.eos_id and not req.ignore_eos:
                self._finish(row, "stop")
                continue
            text = row.text.push(token)
            req.emit(Event(row.index, text, token, float(row_lp[token]), top))
            if row.text.stopped:
                self._finish(row, "stop")
            elif len(row.text.ids) >= req.max_tokens:
                self._finish(row, "length")

    def _finish(self, row: Row, reason: str) -> None:
        """End a row: its last event carries the text held back (none after a stop string)."""
        row.request.open_rows -= 1
        req = row.request
        if reason != "cancelled":
            rest = row.text.finish()
            save = req.save_state and row.index == 0 and reason != ABORT
            state_id = self._save(row) if save else None
            req.emit(Event(row.index, rest, finish_reason=reason, state_id=state_id))
        row.index = -1 - row.index  # marks the row finished (removed after this step)
        if req.open_rows == 0:
            self._close(req, Event(-1, usage={"prompt_tokens": len(req.prompt_ids),
                                              "completion_tokens": req.completion_tokens,
                                              "cached_tokens": req.cached_tokens}))

    def _save(self, row: Row) -> str:
        """The state after every token of this row, kept under a new id (LRU-bounded)."""
        i = self._rows.index(row)
        _, state = decode_one(self.model, torch.tensor([row.last], device=self._state.device),
                              self._state.select([i]))
        key = uuid.uuid4().hex
        self.saved[key] = state
        while len(self.saved) > self.saved_limit:
            self.saved.popitem(last=False)
        return key

    def _remove_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.index >= 0]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._state = self._state.select(keep) if keep else None

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.request.cancelled.is_set() and row.index >= 0:
                self._finish(row, "cancelled")
        self._remove_finished()


def _prompt_logprobs(logits: torch.Tensor, targets: list[int], top: int
                     ) -> list[tuple[int, float, list[tuple[int, float]] | None]]:
    """Each prompt token's log-probability given the tokens before it, with the `top` most
    likely alternatives: logits [T, V] of a segment, targets the T (or T − 1, at the prompt's
    end) tokens that follow its positions."""
    logprobs = _log_softmax(logits[:len(targets)])  # [T', V]
    picked = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
    alternatives = logprobs.topk(top, -1) if top else None
    out = []
    for i, token in enumerate(targets):
        alts = (list(zip(alternatives.indices[i].tolist(), alternatives.values[i].tolist()))
                if alternatives is not None else None)
        out.append((token, float(picked[i]), alts))
    return out


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """In float32 at least, float64 for a float64 model (exact comparisons in tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
