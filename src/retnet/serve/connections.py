"""Connection limits uvicorn lacks: a cap on open connections (one past it is closed at
once, so file handles never run out), a deadline for a request's line and headers (a client
that sends half a header is closed, not kept forever), and a log that says each kind of
trouble once per interval instead of once per connection."""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

# Files the server keeps open besides its connections (weights, tokenizer, the listening
# socket, the interpreter's own): the connection cap stays this far below the process limit.
RESERVED_FILES = 64
LOG_EVERY_S = 10.0


class RateLimited(logging.Filter):
    """Passes the first record of each message template per `every_s` seconds; the next one
    let through says how many were dropped meanwhile."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, object], float] = {}
        self._dropped: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like this in the last {self.every_s:g} s)"
        return True


def quiet_logs(every_s: float = LOG_EVERY_S) -> None:
    """Rate-limit the loggers a flood of connections writes to: asyncio's (its accept loop
    reports running out of file handles) and uvicorn's."""
    for name in ("asyncio", "uvicorn.error", "retnet.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimited) for f in logger.filters):
            logger.addFilter(RateLimited(every_s))


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a header deadline (set as class
    attributes by `limited_h11`)."""

    max_connections = 512
    header_timeout_s = 10.0
    log = logging.getLogger("retnet.serve")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = len(self.connections) >= self.max_connections
        if self._refused:  # closed before uvicorn counts it: the handle is freed at once
            self.log.warning("over --max-connections %d: closing new connections",
                             self.max_connections)
            transport.abort()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes of a next request on a kept-alive connection: its headers get a deadline too
        # (uvicorn's keep-alive timer stops at the first byte).
        if self._between_requests():
            self._arm()
        super().data_received(data)
        if not self._between_requests():
            self._disarm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._between_requests() and not self.transport.is_closing():
            self.log.warning("closing connections that sent no complete request headers "
                             "within --read-timeout-s %g", self.header_timeout_s)
            self.transport.close()


def limited_h11(max_connections: int, header_timeout_s: float) -> type[LimitedH11]:
    """The protocol class to pass as uvicorn's `http`."""
    return type("LimitedH11", (LimitedH11,), {"max_connections": max_connections,
                                               "header_timeout_s": header_timeout_s})


def connection_cap(requested: int) -> int:
    """`requested`, or less where the process's open-file limit could not hold that many
    connections beside the files the server needs."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - RESERVED_FILES))
