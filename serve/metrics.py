"""Prometheus metrics of a server, under the names serving engines use (see
`docs/openai.md`, "Metrics"): calls by method and status, time to first token and per output
token, tokens reused and prefilled, prefix-cache queries and hits per tier, and the
engine's and the store's gauges (the numbers of gRPC `ServerStats`), read when scraped.

Served at `/metrics` on the HTTP port, and on a port of their own if one is given."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("jattn_num_requests_running", "turns in the running batch",
                                value=stats["running"])
        yield GaugeMetricFamily("jattn_num_requests_waiting", "turns waiting in the queue",
                                value=stats["queued"])
        yield GaugeMetricFamily("jattn_sessions", "conversations held in memory",
                                value=stats["sessions"])
        store = stats.get("store", {})
        if store.get("pool_blocks"):
            used = 1 - store["pool_free_blocks"] / store["pool_blocks"]
            yield GaugeMetricFamily("jattn_kv_cache_usage_ratio",
                                    "share of the device KV pool's blocks in use or cached",
                                    value=used)
        for name, value in store.items():
            yield GaugeMetricFamily(f"jattn_store_{name}", f"AttentionStore {name}",
                                    value=float(value))


class Metrics:
    """Records turns and calls into a registry of its own; `port` (if not None) serves
    it over HTTP by itself, `exposition()` gives the text for another server."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, engine, *, port: int | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("jattn_requests", "calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.ttft = Histogram("jattn_time_to_first_token_seconds",
                              "time to first token, request arrival to first token ready",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("jattn_time_per_output_token_seconds",
                              "mean time between a turn's output tokens after the first",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.reused = Counter("jattn_prompt_tokens_reused", "context tokens whose KV was "
                              "reused from a tier", registry=self.registry)
        self.prefilled = Counter("jattn_prompt_tokens_prefilled", "context tokens "
                                 "prefilled (new input and recomputed history)",
                                 registry=self.registry)
        self.generated = Counter("jattn_generation_tokens", "tokens generated",
                                 registry=self.registry)
        self.queries = Counter("jattn_prefix_cache_queries", "context tokens looked up in "
                               "the prefix cache", registry=self.registry)
        self.hits = Counter("jattn_prefix_cache_hits", "context tokens found in the prefix "
                            "cache, by tier", ["tier"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self._server = None
        self.port = None
        if port is not None:
            self._server, _ = start_http_server(port, registry=self.registry)
            self.port = self._server.server_port

    def call(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def turn(self, result, started: float) -> None:
        """A turn that delivered its tokens: `result` is its `ChatTurn`, `started` the
        `time.perf_counter()` at which its request arrived."""
        if result is None or not result.token_ids:
            return
        self.ttft.observe(result.ttft_s)
        if len(result.token_ids) > 1:
            elapsed = time.perf_counter() - started - result.ttft_s
            self.tpot.observe(elapsed / (len(result.token_ids) - 1))
        self.reused.inc(result.cached_tokens)
        self.prefilled.inc(result.recomputed_tokens)
        self.generated.inc(len(result.token_ids))
        self.queries.inc(result.cached_tokens + result.recomputed_tokens)
        blocks = sum((result.tiers or {}).values())
        for tier, count in (result.tiers or {}).items():
            self.hits.labels(tier).inc(result.cached_tokens * count // blocks)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
