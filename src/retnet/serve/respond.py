"""One HTTP request's view of its engine request: engine events arrive on an asyncio queue and
become an OpenAI response, either one JSON body or server-sent events. A client that goes away
is noticed in both cases, and its sequence leaves the batch."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from retnet.serve.engine import Engine
from retnet.serve.request import Busy, Draining, Event
from retnet.serve.request import Request as EngineRequest
from retnet.serve.validate import ApiError
from retnet.tokenizer import Tokenizer

# How often a non-streaming request asks whether its client is still connected.
DISCONNECT_POLL_S = 0.1


def draining() -> ApiError:
    """The answer to a generation request while the server drains."""
    return ApiError(503, "the server is draining (shutting down); retry on another replica",
                    code="server_draining", headers={"Retry-After": "1"})


def state_not_found(state_id: str) -> ApiError:
    return ApiError(404, f"no saved state {state_id!r}; it may have been evicted", "state_id",
                    code="state_not_found")


class Run:
    def __init__(self, engine: Engine, tok: Tokenizer, model_name: str, chat: bool) -> None:
        self.engine, self.tok, self.name, self.chat = engine, tok, model_name, chat
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.id = f"{uuid.uuid4().hex[:24]}"

    def emit(self, event: Event) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def submit(self, req: EngineRequest) -> None:
        """Queue req, or raise the HTTP error that says why not.

        Everything about the request was validated before this: once submitted, nothing but
        the client or the engine ends it."""
        self.req = req
        try:
            self.engine.submit(req)
        except KeyError:  # evicted since the request was validated
            raise state_not_found(req.state_id) from None
        except Draining:
            raise draining() from None
        except Busy as err:
            raise ApiError(429, f"{err}; retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None

    async def respond(self, req: EngineRequest, usage: bool | None,
                      disconnected: Callable[[], Awaitable[bool]]) -> Response:
        """usage None: one JSON body; else a stream (ending with a usage chunk if True)."""
        self.submit(req)
        if usage is not None:
            return StreamingResponse(self._sse(usage), media_type="text/event-stream")
        bodies = await _gather([self], disconnected)
        return Response(status_code=499) if bodies is None else JSONResponse(bodies[0])

    def _head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind,
                "created": int(time.time()), "model": self.name}

    def _usage(self, event: Event) -> dict:
        u = event.usage or {}
        return {"prompt_tokens": u.get("prompt_tokens", 0),
                "completion_tokens": u.get("completion_tokens", 0),
                "total_tokens": u.get("prompt_tokens", 0) + u.get("completion_tokens", 0),
                "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)}}

    def _logprob_entry(self, ev: Event) -> Any:
        tok = self.tok
        if self.req.logprobs is None or ev.token is None:
            return None
        text = tok.decode([ev.token])
        top = [(tok.decode([t]), lp) for t, lp in ev.top_logprobs or []]
        if self.chat:
            return {"content": [{"token": text, "logprob": ev.logprob,
                                 "bytes": list(text.encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp,
                                                   "bytes": list(t.encode())} for t, lp in top]}]}
        return {"tokens": [text], "token_logprobs": [ev.logprob],
                "top_logprobs": [dict(top)], "text_offset": [0]}

    async def _collect(self) -> dict:
        n = self.req.n
        texts, reasons, lps = [""] * n, [None] * n, [[] for _ in range(n)]
        state_id = None
        while True:
            ev = await self.events.get()
            if ev.index < 0:
                if ev.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {ev.usage}", code="server_error")
                break
            texts[ev.index] += ev.text
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
            state_id = ev.state_id or state_id
            if ev.token is not None and self.req.logprobs is not None:
                lps[ev.index].append(self._logprob_entry(ev))
        if self.req.echo:  # each choice starts with the prompt, as OpenAI's echo does
            prompt = self.tok.decode(self.req.prompt_ids)
            texts = [prompt + t for t in texts]
            lps = [self._prompt_entries() + e for e in lps]
        choices = []
        for i in range(n):
            choice: dict[str, Any] = {"index": i, "finish_reason": reasons[i]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": texts[i]}
                choice["logprobs"] = ({"content": [c for e in lps[i] for c in e["content"]]}
                                      if self.req.logprobs is not None else None)
            else:
                choice["text"] = texts[i]
                choice["logprobs"] = _merge_completion_logprobs(lps[i]) if lps[i] else None
            choices.append(choice)
        out = {**self._head(), "choices": choices, "usage": self._usage(ev)}
        if state_id:
            out["state_id"] = state_id
        return out

    def _prompt_entries(self) -> list[dict]:
        """The prompt's logprob entries (completions with echo and logprobs): the first token
        has none, as nothing predicts it."""
        if self.req.prompt_logprobs is None:
            return []
        entries = []
        for token, logprob, top in self.req.prompt_logprobs:
            alternatives = None if top is None else {self.tok.decode([t]): lp for t, lp in top}
            entries.append({"tokens": [self.tok.decode([token])], "token_logprobs": [logprob],
                            "top_logprobs": [alternatives], "text_offset": [0]})
        return entries

    def _chunk(self, ev: Event) -> dict:
        head = self._head()
        head["object"] = "chat.completion.chunk" if self.chat else "text_completion"
        choice: dict[str, Any] = {"index": ev.index, "finish_reason": ev.finish_reason,
                                  "logprobs": self._logprob_entry(ev)}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ev.text} if ev.text else {}
        else:
            choice["text"] = ev.text
        chunk = {**head, "choices": [choice]}
        if ev.state_id:
            chunk["state_id"] = ev.state_id
        return chunk

    async def _sse(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            while True:
                ev = await self.events.get()
                if ev.index < 0:
                    if include_usage:
                        yield _data({**self._head(), "object": self._chunk(ev)["object"],
                                     "choices": [], "usage": self._usage(ev)})
                    break
                if ev.text or ev.finish_reason or self.req.logprobs is not None:
                    yield _data(self._chunk(ev))
            yield "data: [DONE]\n\n"
        finally:
            self.req.cancelled.set()  # a disconnect lands here: the engine frees the row


async def _gather(runs: list[Run], disconnected: Callable[[], Awaitable[bool]]
                  ) -> list[dict] | None:
    """Each submitted run's JSON body, or None if the client left first. On the way out every
    run's request is cancelled (a no-op once finished; frees the rows of a client that left)."""
    tasks = [asyncio.ensure_future(run._collect()) for run in runs]
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
            if pending and await disconnected():
                return None
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.req.cancelled.set()


async def respond_all(runs: list[tuple[Run, EngineRequest]],
                      disconnected: Callable[[], Awaitable[bool]]) -> Response:
    """A completions request with a list of prompts: one engine request each, answered as one
    body whose choice i·n + j is prompt i's choice j (OpenAI's order), usage summed."""
    submitted: list[Run] = []
    try:
        for run, req in runs:
            run.submit(req)
            submitted.append(run)
    except ApiError:  # all or nothing: the queued ones leave again
        for run in submitted:
            run.req.cancelled.set()
        raise
    bodies = await _gather(submitted, disconnected)
    if bodies is None:
        return Response(status_code=499)
    out = dict(bodies[0])
    n = len(bodies[0]["choices"])
    out["choices"] = [{**choice, "index": i * n + choice["index"]}
                      for i, body in enumerate(bodies) for choice in body["choices"]]
    usage = out["usage"] = {key: sum(b["usage"][key] for b in bodies)
                            for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    usage["prompt_tokens_details"] = {"cached_tokens": sum(
        b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies)}
    return JSONResponse(out)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _merge_completion_logprobs(entries: list[dict]) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    offset = 0
    for e in entries:
        out["tokens"] += e["tokens"]
        out["token_logprobs"] += e["token_logprobs"]
        out["top_logprobs"] += e["top_logprobs"]
        out["text_offset"].append(offset)
        offset += len(e["tokens"][0])
    return out
