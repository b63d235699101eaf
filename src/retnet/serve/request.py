"""What the engine and the HTTP side exchange: a Request (what a client asked for), the Events
its client hears, the Row each of its choices becomes while decoding (and its status), and the
two refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from retnet.generation import SamplingParams, TextStream
from retnet.model import RetNetState


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 429)."""


class Draining(Busy):
    """The server is shutting down: the client should go elsewhere (HTTP 503)."""


ABORT = "abort"  # the finish_reason of sequences still running when the drain window ends


@dataclass
class Event:
    """One thing a request's client hears: a text delta, a finish, or the final usage."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    usage: dict | None = None  # only on the last event of a request (index -1)
    state_id: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top alternatives; None: no logprobs
    echo: bool = False  # the completion starts with the prompt (and its logprobs, if asked)
    message_ends: list[int] = field(default_factory=list)
    state_id: str | None = None  # continue from a saved conversation state
    save_state: bool = False
    ignore_eos: bool = False  # generate exactly max_tokens (load tests)
    # The HTTP request it belongs to (one per prompt of a list share it): the unit of fair
    # shares in the batch. None: a group of its own.
    group: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    # filled by the engine
    initial_state: RetNetState | None = None  # the saved state of state_id, taken at submit
    cached_tokens: int = 0
    # echo with logprobs: (token, logprob, top alternatives) per prompt token; the first
    # token's are None (nothing predicts it), as in OpenAI's API
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None
    completion_tokens: int = 0
    open_rows: int = 0
    closed: bool = False  # its last event was emitted (or it was dropped): no longer in flight


class RowStatus(Enum):
    DECODING = "decoding"
    FINISHED = "finished"  # its last event is out; it leaves the batch after this step


@dataclass
class Row:
    """One sequence being decoded (one choice of one request)."""

    request: Request
    index: int  # which choice of the request
    generator: torch.Generator
    last: int  # the newest token, not yet consumed by the state
    text: TextStream  # its tokens so far, and the part of their text already emitted
    counts: torch.Tensor | None = None  # [1, V] times each token was drawn (penalties only)
    status: RowStatus = RowStatus.DECODING
