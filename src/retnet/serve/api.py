"""OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions (with
server-sent events), /v1/models, /health, /metrics. Every request is validated and limited;
errors use OpenAI's {"error": {...}} shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from retnet.generate import SamplingParams
from retnet.serve.chat import render_chat
from retnet.serve.engine import Busy, Engine, Event
from retnet.serve.engine import Request as EngineRequest
from retnet.tokenizer import Tokenizer


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    max_n: int = 8
    max_request_bytes: int = 1 << 20
    max_stop: int = 4
    max_logprobs: int = 5


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
          "user", "stream_options", "save_state", "state_id", "ignore_eos"}
COMPLETION_KEYS = COMMON | {"prompt", "logprobs", "echo", "best_of", "frequency_penalty",
                            "presence_penalty", "logit_bias", "suffix"}
CHAT_KEYS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                      "frequency_penalty", "presence_penalty", "logit_bias"}
# Accepted only at their neutral values.
NEUTRAL = {"echo": (False, None), "best_of": (1, None), "frequency_penalty": (0, 0.0, None),
           "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}), "suffix": (None, "")}


def _number(body: dict, key: str, default, lo, hi, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key} must be a {'integer' if kind is int else 'number'}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}; got {value}", key)
    return kind(value)


class Api:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 limits: Limits, chat_template: dict[str, str]) -> None:
        self.engine, self.tok, self.name, self.limits = engine, tokenizer, model_name, limits
        self.chat_template = chat_template
        self.created = int(time.time())

    # ---- request parsing -----------------------------------------------------------------
    def _check_keys(self, body: dict, allowed: set[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
        for key, neutral in NEUTRAL.items():
            if key in body and body[key] not in neutral:
                raise ApiError(400, f"{key} is not supported by this server", key)
        if body.get("model") != self.name:
            raise ApiError(404, f"model {body.get('model')!r} does not exist; this server "
                           f"serves {self.name!r}", "model", code="model_not_found")

    def _common(self, body: dict, prompt_ids: list[int], emit, message_ends=()) -> EngineRequest:
        lim = self.limits
        if len(prompt_ids) > lim.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                           f"{lim.max_prompt_tokens}", "prompt", code="context_length_exceeded")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 16, 1, lim.max_tokens, int)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
                and len(stop) <= lim.max_stop):
            raise ApiError(400, f"stop must be a string or up to {lim.max_stop} strings", "stop")
        params = SamplingParams(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
                                top_k=_number(body, "top_k", None, 1, 10**6, int))
        seed = _number(body, "seed", None, 0, 2**62, int)
        state_id = body.get("state_id")
        if state_id is not None and state_id not in self.engine.saved:
            raise ApiError(404, f"no saved state {state_id!r}; it may have been evicted",
                           "state_id", code="state_not_found")
        return EngineRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, params=params,
                             emit=emit, stop=stop, seed=seed,
                             n=_number(body, "n", 1, 1, lim.max_n, int),
                             message_ends=list(message_ends), state_id=state_id,
                             save_state=bool(body.get("save_state", False)),
                             ignore_eos=bool(body.get("ignore_eos", False)))

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < self.tok.vocab_size for t in ids):
                raise ApiError(400, "prompt token ids must be in [0, vocab size)", "prompt")
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
        return ids or [self.tok.eos_id]

    # ---- endpoints -----------------------------------------------------------------------
    async def completions(self, body: dict) -> Any:
        self._check_keys(body, COMPLETION_KEYS)
        ids = self._prompt_ids(body.get("prompt", ""))
        run = _Run(self)
        req = self._common(body, ids, run.emit)
        req.logprobs = _number(body, "logprobs", None, 0, self.limits.max_logprobs, int)
        return await run.respond(req, body, chat=False)

    async def chat(self, body: dict) -> Any:
        self._check_keys(body, CHAT_KEYS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} strings",
                           "messages")
        ids, ends = render_chat(messages, self.tok, self.chat_template)
        run = _Run(self)
        req = self._common(body, ids, run.emit, ends)
        if body.get("logprobs"):
            req.logprobs = max(1, _number(body, "top_logprobs", 1, 0, self.limits.max_logprobs,
                                          int))
        return await run.respond(req, body, chat=True)


class _Run:
    """One HTTP request's view of its engine request: events arrive on an asyncio queue."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.id = f"{uuid.uuid4().hex[:24]}"

    def emit(self, event: Event) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def respond(self, req: EngineRequest, body: dict, chat: bool) -> Any:
        try:
            self.api.engine.submit(req)
        except Busy as err:
            raise ApiError(429, f"{err}; retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        self.req, self.chat = req, chat
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._sse(usage), media_type="text/event-stream")
        try:
            return JSONResponse(await self._collect())
        finally:
            req.cancelled.set()  # no-op when finished; frees the slot if we were cancelled

    def _head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind,
                "created": int(time.time()), "model": self.api.name}

    def _usage(self, event: Event) -> dict:
        u = event.usage or {}
        return {"prompt_tokens": u.get("prompt_tokens", 0),
                "completion_tokens": u.get("completion_tokens", 0),
                "total_tokens": u.get("prompt_tokens", 0) + u.get("completion_tokens", 0),
                "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)}}

    def _logprob_entry(self, ev: Event) -> Any:
        tok = self.api.tok
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


def create_app(api: Api, on_shutdown=None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_shutdown is not None:  # drain in-flight streams, then stop the engine
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="retnet", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": err.message, "type": "invalid_request_error"
                                       if err.status < 500 else "server_error",
                                       "param": err.param, "code": err.code}},
                            status_code=err.status, headers=err.headers)

    async def _body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        limit = api.limits.max_request_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(await _body(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await api.chat(await _body(request))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.name, "object": "model",
                                            "created": api.created, "owned_by": "retnet"}]}

    @app.get("/health")
    async def health():
        ok = api.engine.accepting
        return JSONResponse({"status": "ok" if ok else "shutting down"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return api.engine.snapshot()

    return app
