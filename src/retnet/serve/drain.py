"""Graceful shutdown: on the first SIGTERM/SIGINT the server keeps listening while it drains,
so that /health can answer 503 {"status": "draining"} (a load balancer then stops sending)
and new requests get 503; in-flight requests get drain_s seconds to finish, the rest end with
finish_reason "abort" (streams then send `data: [DONE]`). Only then does uvicorn stop. A second
signal stops at once."""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn

from retnet.serve.engine import Engine


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float) -> None:
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: no more waiting
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.draining = True
        # The drain blocks for up to drain_s: not in a signal handler on the event loop's thread.
        threading.Thread(target=self._drain, name="retnet-drain", daemon=True).start()

    def _drain(self) -> None:
        self.engine.drain(self.drain_s)
        self.should_exit = True  # uvicorn's main loop notices within 0.1 s
