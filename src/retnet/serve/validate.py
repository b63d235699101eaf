"""Request validation for the HTTP API. The whole body is checked before anything is queued,
with the types and nullability of OpenAI's schema (null means "unset"); each error is a 4xx
naming the field, and never echoes more than about 100 characters of the input."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from retnet.options import short


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    max_n: int = 8
    max_request_bytes: int = 1 << 20
    max_stop: int = 4
    max_logprobs: int = 5
    max_prompts: int = 32  # prompts in one completions request (a list of prompts)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error shape; the message is bounded whatever produced it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if len(message) > 500:
        message = message[:500] + "…"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
          "user", "stream_options", "save_state", "state_id", "ignore_eos"}
COMPLETION_KEYS = COMMON | {"prompt", "logprobs", "echo", "best_of", "frequency_penalty",
                            "presence_penalty", "logit_bias", "suffix"}
CHAT_KEYS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                      "frequency_penalty", "presence_penalty", "logit_bias"}
# Accepted only at their neutral values, compared with their types (0 is not false).
NEUTRAL = {"best_of": (1, None), "logit_bias": ({}, None), "suffix": ("", None)}
# Saved-state ids are uuid4 hex; anything else (paths, lists, 500 KB strings) is a 400.
STATE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Every valid integer field is below 2**62 (19 digits). Bounded while parsing: int() of a
# long digit string takes quadratic time where Python (< 3.10.7) does not limit it itself.
MAX_DIGITS = 100


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; NaN, Infinity, numbers that overflow to infinity (1e999)
    and integers of more than MAX_DIGITS digits are a 400 too."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    _check_unicode(body)
    return body


def _no_constant(name: str) -> None:
    raise ApiError(400, f"the body holds {name}, which JSON does not allow; send a number",
                   code="invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"the number {short(text, 40)} is out of range (it would be "
                       "infinite)", code="invalid_json")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ApiError(400, f"an integer of {len(text.lstrip('-'))} digits is not accepted "
                       f"(at most {MAX_DIGITS})", code="invalid_json")
    return int(text)


def _check_unicode(body: dict) -> None:
    """A lone surrogate ("\\ud800") decodes into a str that cannot be encoded as UTF-8: refuse
    it here, once for every string field, instead of failing in the tokenizer. Iterative, so a
    deeply nested body cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = list(body.items())
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(key, k) for k in value] + [(key, v) for v in value.values()]
        elif isinstance(value, list):
            stack += [(key, v) for v in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{short(key)} holds a lone UTF-16 surrogate (such as "
                               "\\ud800), which is not text; send valid Unicode",
                               key if key in CHAT_KEYS | COMPLETION_KEYS else None) from None


def number(body: dict, key: str, default: Any, lo: float, hi: float, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}; "
                       f"got {short(value)}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}; got {short(value)}", key)
    return kind(value)


def flag(body: dict, key: str) -> bool:
    """A JSON boolean or null: "false" is a string, and a string is not false."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false; got {short(value)}", key)
    return bool(value)


def check_keys(body: dict, allowed: set[str], model_name: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        names = short(", ".join(unknown))[1:-1]
        raise ApiError(400, f"unsupported parameter(s): {names}", short(unknown[0], 60))
    for key, neutral in NEUTRAL.items():
        if key in body and not any(type(body[key]) is type(n) and body[key] == n
                                   for n in neutral):
            raise ApiError(400, f"{key} is not supported by this server; omit it or send "
                           f"{json.dumps(neutral[0])}", key)
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string naming the model; this server serves "
                       f"{model_name!r}", "model")
    if model != model_name:
        raise ApiError(404, f"model {short(model)} does not exist; this server serves "
                       f"{model_name!r}", "model", code="model_not_found")


def stream_usage(body: dict) -> bool | None:
    """None: not streaming; else whether the stream ends with a usage chunk."""
    stream, options = flag(body, "stream"), body.get("stream_options")
    if options is None:
        return False if stream else None
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object or null; got {short(options)}",
                       "stream_options")
    if not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true",
                       "stream_options")
    return flag(options, "include_usage")


def stop_strings(body: dict, max_stop: int) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
            and len(stop) <= max_stop):
        raise ApiError(400, f"stop must be a string or up to {max_stop} non-empty strings",
                       "stop")
    return stop


def max_tokens(body: dict, limit: int) -> int:
    """max_completion_tokens (chat) wins over max_tokens unless it is null; unset: 16 (OpenAI's
    default for completions), within the server's limit."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return number(body, key, min(16, limit), 1, limit, int)


def state_id(body: dict) -> str | None:
    value = body.get("state_id")
    if value is not None and not (isinstance(value, str) and STATE_ID.fullmatch(value)):
        raise ApiError(400, "state_id must be a string of up to 64 letters, digits, '-' or '_' "
                       "(as returned by save_state)", "state_id")
    return value


def messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise ApiError(400, "messages must be a non-empty list of {role, content} strings",
                       "messages")
    return value
