"""Prometheus metrics for the serving path, scraped over HTTP (``--metrics-port``).

Latency histograms (TTFT, inter-token, end-to-end, queue), token and request counters, and gauges
read from the engine's latest stats at scrape time (running, waiting, KV pages, prefix-cache hit
rate). One registry per server so tests can run several servers in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kimi_grpc.engine.llm_engine import EngineStats, SequenceDelta
from kimi_grpc.guided import GuidedStats
from kimi_grpc.proto import inference_pb2 as pb

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class _EngineGauges(Collector):
    def __init__(self, stats: Callable[[], EngineStats], counters: ServerMetrics) -> None:
        self._stats = stats
        self._hits = counters.prefix_hit_ratio

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        usage = stats.pages_used / max(stats.pages_total, 1)
        for name, doc, value in (
            ("kimi_requests_running", "Sequences running in the engine", stats.running),
            ("kimi_requests_waiting", "Sequences waiting for admission", stats.waiting),
            ("kimi_kv_pages_total", "KV cache pages", stats.pages_total),
            ("kimi_kv_pages_used", "KV cache pages held by sequences", stats.pages_used),
            ("kimi_kv_pages_cached", "Free KV pages holding reusable prefixes", stats.pages_cached),
            ("kimi_kv_usage_ratio", "Used share of the KV cache", usage),
            ("kimi_prefix_cache_hit_ratio", "Prompt tokens from the prefix cache", self._hits()),
            ("kimi_kv_host_pages_total", "Host-tier KV pages (0: off)", stats.host_pages_total),
            ("kimi_kv_host_pages_used", "Host-tier KV pages holding a page", stats.host_pages_used),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        tiers = stats.tiers
        for name, doc, value in (
            (
                "kimi_kv_device_hit_pages",
                "Prefix-cache pages hit on the device",
                tiers.device_hit_pages,
            ),
            (
                "kimi_kv_host_hit_pages",
                "Prefix-cache pages loaded back from host",
                tiers.host_hit_pages,
            ),
            ("kimi_kv_saved_pages", "Evicted device pages saved to host", tiers.saved_pages),
            (
                "kimi_kv_partial_hit_tokens",
                "Prompt tokens served from pages matched partway (an agent's next step)",
                tiers.partial_hit_tokens,
            ),
            ("kimi_kv_bytes_saved", "Bytes copied device -> host", stats.bytes_saved),
            ("kimi_kv_bytes_loaded", "Bytes copied host -> device", stats.bytes_loaded),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class _GuidedCounters(Collector):
    def __init__(self, stats: GuidedStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self._stats
        for name, doc, value in (
            ("kimi_guided_requests", "Requests run with a grammar", s.constrained_requests),
            (
                "kimi_guided_lenient_fallbacks",
                "Schemas compiled leniently (keywords the grammar engine cannot enforce)",
                s.lenient_fallbacks,
            ),
            ("kimi_guided_rejected_tokens", "Tokens a grammar refused", s.rejected_tokens),
            ("kimi_guided_masks", "Token masks computed", s.masks),
            ("kimi_guided_mask_seconds", "Host time computing token masks", s.mask_seconds),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], guided: GuidedStats | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "kimi_time_to_first_token_seconds",
            "Call start to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kimi_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kimi_e2e_request_latency_seconds",
            "Call start to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "kimi_queue_time_seconds", "Engine admission wait", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("kimi_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "kimi_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.generation_tokens = Counter("kimi_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "kimi_requests_finished", "Finished completions", ["rpc", "reason"], registry=r
        )
        self.rejected = Counter(
            "kimi_requests_rejected", "Refused calls by status code", ["rpc", "code"], registry=r
        )
        self.http_requests = Counter(
            "kimi_http_requests",
            "OpenAI-compatible HTTP API responses by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens_total = 0  # mirrors of the counters, for GetServerStatus
        self.cached_tokens_total = 0
        r.register(_EngineGauges(stats, self))
        if guided is not None:
            r.register(_GuidedCounters(guided))

    def record_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.prompt_tokens_total += prompt_tokens
        self.cached_tokens_total += cached_tokens

    def prefix_hit_ratio(self) -> float:
        prompt = self.prompt_tokens_total
        return self.cached_tokens_total / prompt if prompt else 0.0

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the /metrics HTTP server on a thread; returns its port (``port`` 0 picks one)."""
        http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return http_server.server_port


class RequestClock:
    """TTFT / inter-token / end-to-end timing of one call, fed into the metrics."""

    def __init__(self, metrics: ServerMetrics | None) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.queue: float | None = None  # seconds, from the engine's first delta

    def admitted(self, delta: SequenceDelta) -> None:
        """The call's first engine delta: prompt / prefix-cache tokens and queue time."""
        self.queue = delta.queue_time
        if self.metrics is None:
            return
        self.metrics.record_prompt(delta.num_prompt_tokens, delta.num_cached_tokens)
        if delta.queue_time is not None:
            self.metrics.queue.observe(delta.queue_time)

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            if self.metrics:
                self.metrics.ttft.observe(now - self.start)
        elif self.metrics and self.last is not None:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        if self.metrics:
            self.metrics.generation_tokens.inc(count)

    def timings(self) -> pb.Timings:
        now = time.monotonic()
        first = self.first if self.first is not None else now
        last = self.last if self.last is not None else now
        if self.metrics:
            self.metrics.e2e.observe(now - self.start)
        return pb.Timings(
            time_to_first_token_ms=(first - self.start) * 1e3,
            decode_ms=(last - first) * 1e3,
            e2e_ms=(now - self.start) * 1e3,
            queue_ms=(self.queue or 0.0) * 1e3,
        )
