"""The engine's counters (`GET /metrics` reads them through `Engine.snapshot`): plain numbers
the engine thread adds to, and the means derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Counters:
    """Totals since the server started (and the latest and largest batch)."""

    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    batch_size_last: int = 0
    batch_size_max: int = 0
    batch_size_sum: int = 0
    ttft_s_sum: float = 0.0
    ttft_count: int = 0
    step_s_sum: float = 0.0

    def decode_step(self, batch_size: int, seconds: float) -> None:
        """One decode step of `batch_size` rows that took `seconds`."""
        self.decode_steps += 1
        self.batch_size_last, self.batch_size_sum = batch_size, self.batch_size_sum + batch_size
        self.batch_size_max = max(self.batch_size_max, batch_size)
        self.step_s_sum += seconds

    def first_token(self, seconds: float) -> None:
        """A request's first token came `seconds` after it arrived."""
        self.ttft_s_sum += seconds
        self.ttft_count += 1

    def snapshot(self) -> dict:
        """The totals, and the mean batch size, step time and time to first token."""
        steps = max(self.decode_steps, 1)
        return dataclasses.asdict(self) | {
            "batch_size_mean": self.batch_size_sum / steps,
            "step_ms_mean": 1e3 * self.step_s_sum / steps,
            "ttft_ms_mean": 1e3 * self.ttft_s_sum / max(self.ttft_count, 1)}
