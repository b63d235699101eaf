"""OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions (with
server-sent events), /v1/models, /health, /metrics (Prometheus text), and vLLM's /tokenize,
/detokenize and /tokenizer_info (lm_eval's remote tokenizer). Every request is read within its
size limit and validated whole before it is queued; errors use OpenAI's {"error": {...}}
shape."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from retnet.generation import SamplingParams
from retnet.serve import validate as v
from retnet.serve.engine import Engine
from retnet.serve.guard import Guard
from retnet.serve.metrics import CONTENT_TYPE, prometheus_text, registry
from retnet.serve.request import Request as EngineRequest
from retnet.serve.respond import Run, draining, respond_all, state_not_found
from retnet.serve.validate import ApiError, Limits, error_body
from retnet.tokenizer import EOS, PAD, Tokenizer, chat_template_jinja, render_chat

Disconnected = Callable[[], Awaitable[bool]]


class Api:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 limits: Limits, chat_template: dict[str, str], read_timeout_s: float = 10.0
                 ) -> None:
        self.engine, self.tok, self.name, self.limits = engine, tokenizer, model_name, limits
        self.read_timeout_s = read_timeout_s  # for a request's body, once its headers came
        self.chat_template = chat_template
        self.created = int(time.time())
        # No token decodes to more than `longest` characters (+1: a decoder may add a space
        # between tokens), so a longer prompt cannot fit and is refused before tokenising.
        longest = max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)),
                      default=1)
        self.max_prompt_chars = limits.max_prompt_tokens * (longest + 1)

    def _check_chars(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"the prompt has {chars} characters, more than "
                           f"{self.limits.max_prompt_tokens} tokens (the limit) can hold",
                           "prompt", code="context_length_exceeded")

    def _common(self, body: dict, prompt_ids: list[int], run: Run,
                message_ends=()) -> EngineRequest:
        lim = self.limits
        if len(prompt_ids) > lim.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is "
                           f"{lim.max_prompt_tokens}", "prompt", code="context_length_exceeded")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise ApiError(400, "user must be a string", "user")
        params = SamplingParams(temperature=v.number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=v.number(body, "top_p", 1.0, 1e-6, 1.0),
                                top_k=v.number(body, "top_k", None, 1, 10**6, int),
                                presence_penalty=v.number(body, "presence_penalty", 0.0, -2, 2),
                                frequency_penalty=v.number(body, "frequency_penalty", 0.0, -2, 2))
        state_id = v.state_id(body)
        if state_id is not None and state_id not in self.engine.saved:
            raise state_not_found(state_id)
        save_state = v.flag(body, "save_state")
        if save_state and not self.engine.saved.fits(self.engine.state_nbytes):
            raise ApiError(400, f"save_state is off on this server: one state takes "
                           f"{self.engine.state_nbytes / 2**20:.1f} MiB, more than "
                           "--state-store-mib holds", "save_state")
        return EngineRequest(prompt_ids=prompt_ids, max_tokens=v.max_tokens(body, lim.max_tokens),
                             params=params, emit=run.emit, stop=v.stop_strings(body, lim.max_stop),
                             seed=v.number(body, "seed", None, 0, 2**62, int),
                             n=v.number(body, "n", 1, 1, lim.max_n, int),
                             message_ends=list(message_ends), state_id=state_id,
                             save_state=save_state,
                             ignore_eos=v.flag(body, "ignore_eos"))

    async def _prompts(self, prompt: Any) -> list[list[int]]:
        """OpenAI's prompt: a string, a list of token ids, or a non-empty list of either (one
        completion each); the token ids of each."""
        many = isinstance(prompt, list) and bool(prompt) and all(
            isinstance(p, (str, list)) for p in prompt)
        prompts = prompt if many else [prompt]
        if len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts in one request; at most "
                           f"{self.limits.max_prompts}", "prompt")
        self._check_chars(sum(len(p) for p in prompts if isinstance(p, str)))
        return [await self._prompt_ids(p) for p in prompts]

    async def _prompt_ids(self, prompt: Any) -> list[int]:
        if prompt is None or isinstance(prompt, str):
            self._check_chars(len(prompt or ""))
            # In a worker thread: a long prompt must not stall the event loop (other streams).
            ids = await asyncio.to_thread(self.tok.encode, prompt or "")
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < self.tok.vocab_size for t in ids):
                raise ApiError(400, "prompt token ids must be in [0, vocab size)", "prompt")
        else:
            raise ApiError(400, "prompt must be a string, a list of token ids, or a list of "
                           "those", "prompt")
        return ids or [self.tok.eos_id]

    async def completions(self, body: dict, disconnected: Disconnected) -> Response:
        v.check_keys(body, v.COMPLETION_KEYS, self.name)
        usage = v.stream_usage(body)
        prompts = await self._prompts(body.get("prompt"))
        echo = v.flag(body, "echo")
        if usage is not None and (echo or len(prompts) > 1):
            raise ApiError(400, "echo and a list of prompts need stream false", "stream")
        if len(prompts) > 1 and v.flag(body, "save_state"):
            raise ApiError(400, "save_state takes one prompt, not a list", "save_state")
        runs = []
        group = object()  # its prompts hold one fair share of the batch together
        for ids in prompts:  # every prompt validated before any is queued
            run = Run(self.engine, self.tok, self.name, chat=False)
            req = self._common(body, ids, run)
            req.group = group
            req.logprobs = v.number(body, "logprobs", None, 0, self.limits.max_logprobs, int)
            req.echo = echo
            runs.append((run, req))
        if len(runs) == 1:
            return await run.respond(req, usage, disconnected)
        return await respond_all(runs, disconnected)

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: what a client needs to tokenise as the server does."""
        return {"tokenizer_class": type(self.tok).__name__, "eos_token": EOS,
                "bos_token": None, "pad_token": PAD if self.tok.pad_id != self.tok.eos_id else EOS,
                "chat_template": chat_template_jinja(self.chat_template),
                "model_max_length": self.limits.max_prompt_tokens}

    async def tokenize(self, body: dict) -> dict:
        """vLLM's /tokenize of {"prompt"}: the ids /v1/completions reads for that string.
        The end-of-text token's own text maps to its id (that is how clients learn it)."""
        v.check_keys(_named(body, self.name), {"prompt", "add_special_tokens", "model"},
                     self.name)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        v.flag(body, "add_special_tokens")  # accepted for vLLM clients; there are none to add
        self._check_chars(len(prompt))
        ids = [self.tok.eos_id] if prompt == EOS else await asyncio.to_thread(
            self.tok.encode, prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.limits.max_prompt_tokens}

    def detokenize(self, body: dict) -> dict:
        v.check_keys(_named(body, self.name), {"tokens", "model"}, self.name)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and len(ids) <= self.limits.max_prompt_tokens
                and all(type(t) is int and 0 <= t < self.tok.vocab_size for t in ids)):
            raise ApiError(400, f"tokens must be a list of up to {self.limits.max_prompt_tokens}"
                           " token ids in [0, vocab size)", "tokens")
        return {"prompt": self.tok.decode(ids)}

    async def chat(self, body: dict, disconnected: Disconnected) -> Response:
        v.check_keys(body, v.CHAT_KEYS, self.name)
        usage = v.stream_usage(body)
        messages = v.messages(body)
        self._check_chars(sum(len(m["role"]) + len(m["content"]) for m in messages))
        ids, ends = await asyncio.to_thread(render_chat, messages, self.tok, self.chat_template)
        run = Run(self.engine, self.tok, self.name, chat=True)
        req = self._common(body, ids, run, ends)
        top = v.number(body, "top_logprobs", 1, 0, self.limits.max_logprobs, int)
        if v.flag(body, "logprobs"):
            req.logprobs = max(1, top)
        return await run.respond(req, usage, disconnected)


def _named(body: dict, name: str) -> dict:
    """The tokenizer endpoints' body: "model" is optional there (lm_eval sends none)."""
    return body if "model" in body else {**body, "model": name}


async def read_body(request: Request, limit: int, timeout_s: float = 10.0) -> dict:
    """The JSON body, read chunk by chunk and abandoned at `limit` bytes whatever the transfer
    encoding (a chunked upload has no Content-Length to refuse up front), or after
    `timeout_s` (a client trickling its body must not hold a connection forever)."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s "
                       "(--read-timeout-s)", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def _read_body(request: Request, limit: int) -> dict:
    too_large = ApiError(413, f"request body over {limit} bytes", code="request_too_large",
                         headers={"Connection": "close"})  # the rest is never read
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return v.parse_json(b"".join(chunks))


def create_app(api: Api, on_shutdown=None, api_key: str | None = None,
               allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_shutdown is not None:  # drain in-flight streams, then stop the engine
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="retnet", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param, err.code),
                            status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(error_body(err.status_code, f"{err.detail}: {request.method} "
                                       f"{request.url.path[:100]}", None, code),
                            status_code=err.status_code, headers=err.headers)

    async def body_of(request: Request) -> dict:
        return await read_body(request, api.limits.max_request_bytes, api.read_timeout_s)

    async def generation(request: Request, endpoint) -> Response:
        if not api.engine.accepting:
            raise draining()
        body = await body_of(request)
        return await endpoint(body, request.is_disconnected)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, api.completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generation(request, api.chat)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.name, "object": "model",
                                            "created": api.created, "owned_by": "retnet"}]}

    @app.get("/health")
    async def health():
        ok = api.engine.accepting
        return JSONResponse({"status": "ok" if ok else "draining"},
                            status_code=200 if ok else 503)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await api.tokenize(await body_of(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return api.detokenize(await body_of(request))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return api.tokenizer_info()

    prometheus = registry(api.engine.snapshot, api.name)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        if format == "json":  # the same counters as one object (benchmarks/serve_load.py)
            return api.engine.snapshot()
        if format != "prometheus":
            raise ApiError(400, "format must be prometheus (the default) or json", "format")
        return Response(prometheus_text(prometheus), media_type=CONTENT_TYPE)

    return app
