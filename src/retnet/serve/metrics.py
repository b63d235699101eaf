"""The engine's counters as Prometheus text (`GET /metrics`, what vLLM and every scraper
expect), through prometheus_client: a collector reads `Engine.snapshot()` at each scrape, so
the engine keeps plain counters and never imports prometheus_client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# snapshot key → (metric name without the retnet_ prefix or _total, help)
COUNTERS = {
    "requests": ("requests", "requests accepted into the queue"),
    "rejected": ("requests_rejected", "requests refused with 429 (queue full)"),
    "prompt_tokens": ("prompt_tokens", "prompt tokens received"),
    "cached_tokens": ("prompt_tokens_cached", "prompt tokens read from the prefix-state cache"),
    "prefilled_tokens": ("prompt_tokens_prefilled", "prompt tokens run through the model"),
    "generated_tokens": ("generation_tokens", "tokens generated"),
    "saved_states_evicted": ("saved_states_evicted", "saved states dropped to stay within "
                             "--state-store-mib (least recently used first)"),
}
GAUGES = {
    "active_sequences": ("num_requests_running", "sequences in the decode batch"),
    "queued_requests": ("num_requests_waiting", "requests waiting for a slot"),
    "prefilling_requests": ("num_requests_prefilling", "requests reading their prompt"),
    "batch_size_max": ("batch_size_max", "largest decode batch so far"),
    "prefix_cache_entries": ("prefix_cache_entries", "prefix states cached"),
    "prefix_cache_bytes": ("prefix_cache_bytes", "bytes held by the prefix-state cache"),
    "saved_states": ("saved_states", "conversation states saved by clients (save_state)"),
    "saved_state_bytes": ("saved_states_bytes", "bytes held by saved states (bounded by "
                          "--state-store-mib)"),
}
# (name, help, count key, sum key): observations summarised by their count and sum
SUMMARIES = [
    ("time_to_first_token_seconds", "time from arrival to the first token", "ttft_count",
     "ttft_s_sum"),
    ("decode_step_seconds", "time of one batched decode step", "decode_steps", "step_s_sum"),
    ("decode_batch_size", "sequences in each decode step", "decode_steps", "batch_size_sum"),
]


class EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict], model_name: str) -> None:
        self.snapshot, self.model_name = snapshot, model_name

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        for key, (name, doc) in COUNTERS.items():
            family = CounterMetricFamily(f"retnet_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], m[key])
            yield family
        for key, (name, doc) in GAUGES.items():
            family = GaugeMetricFamily(f"retnet_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], m[key])
            yield family
        for name, doc, count, total in SUMMARIES:
            family = SummaryMetricFamily(f"retnet_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], count_value=m[count], sum_value=m[total])
            yield family


def registry(snapshot: Callable[[], dict], model_name: str) -> CollectorRegistry:
    """A registry of its own (not the process-wide default): two apps in one process, as in
    the tests, do not collide."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(EngineCollector(snapshot, model_name))
    return reg


def prometheus_text(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
