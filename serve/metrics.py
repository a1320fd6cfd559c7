"""Prometheus metrics of a server (off unless a port is given): requests by method and
status, TTFT and TPOT histograms, tokens reused, blocks reused per tier, and the
engine's and the store's gauges, read when scraped."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name in ("queued", "running", "sessions"):
            yield GaugeMetricFamily(f"jattn_{name}", f"turns or sessions {name} now",
                                    value=stats[name])
        for name, value in stats.get("store", {}).items():
            yield GaugeMetricFamily(f"jattn_store_{name}", f"AttentionStore {name}",
                                    value=float(value))


class Metrics:
    """Records turns; serves them on `port` when it is not None."""

    def __init__(self, engine, *, port: int | None):
        self.enabled = port is not None
        self._server = None
        if not self.enabled:
            return
        self.registry = CollectorRegistry()
        self.requests = Counter("jattn_requests", "calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.ttft = Histogram("jattn_ttft_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("jattn_tpot_seconds", "time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.reused = Counter("jattn_tokens_reused", "context tokens whose KV was reused",
                              registry=self.registry)
        self.tier_blocks = Counter("jattn_tier_blocks", "KV blocks reused, by tier",
                                   ["tier"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self._server, _ = start_http_server(port, registry=self.registry)
        self.port = self._server.server_port

    def call(self, method: str, code: str) -> None:
        if self.enabled:
            self.requests.labels(method, code).inc()

    def turn(self, result, started: float) -> None:
        """A turn that delivered its tokens: `result` is its `ChatTurn`, `started` the
        `time.perf_counter()` at which its request arrived."""
        if not self.enabled or result is None or not result.token_ids:
            return
        self.ttft.observe(result.ttft_s)
        if len(result.token_ids) > 1:
            elapsed = time.perf_counter() - started - result.ttft_s
            self.tpot.observe(elapsed / (len(result.token_ids) - 1))
        self.reused.inc(result.cached_tokens)
        for tier, blocks in (result.tiers or {}).items():
            self.tier_blocks.labels(tier).inc(blocks)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
