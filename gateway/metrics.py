"""Prometheus metrics of the gateway, with vLLM's names, types, meanings and buckets, so that
dashboards built for vLLM work unchanged. One registry per app.

Request-level figures (tokens, latencies, finish reasons) are observed here as requests pass
through the gateway. Engine-level figures (queue lengths, KV-cache usage, preemptions, prefix
cache) live in the scheduler: each scrape fetches them with GetStats and a custom collector
exports them, the cumulative ones as counters that carry the scheduler's running totals.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.protos import scheduler_pb2

logger = logging.getLogger(__name__)

# Buckets as vLLM's v1 Prometheus logger defines them.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class SchedulerStatsCollector:
    """Exports the scheduler's last GetStats answer (fetched by the /metrics route)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: scheduler_pb2.SchedulerStats | None = None

    def describe(self):
        return []  # no fixed description: families appear once stats arrived

    def collect(self):
        s = self.stats
        if s is None:
            return
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            s.num_running,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            s.num_waiting,
        )
        usage = 1.0 - s.num_free_blocks / s.num_total_blocks if s.num_total_blocks else 0.0
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            s.num_preemptions,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits,
        )


class GatewayMetrics:
    """vLLM's request metrics plus the scheduler's engine metrics, labelled by model name."""

    def __init__(self, model_name: str = "default") -> None:
        self.model_name = ""
        self.registry = CollectorRegistry(auto_describe=True)
        self.scheduler_stats = SchedulerStatsCollector(model_name)
        self.registry.register(self.scheduler_stats)
        reg = self.registry
        self.http_requests = Counter(
            "splitserve_http_requests",
            "HTTP requests by route and status.",
            ["endpoint", "status"],
            registry=reg,
        )
        m = ["model_name"]
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=reg
        )
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", m, registry=reg
        )
        self._request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            m,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self._inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            m,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self._e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            m,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        )
        self._queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            m,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=reg,
        )
        self.set_model_name(model_name)

    def set_model_name(self, model_name: str) -> None:
        """The `model_name` label (the first served name, known once the services answered)."""
        # NOTE: renamed at start-up only, before any request: nothing recorded is lost.
        for family in (
            self._prompt_tokens,
            self._generation_tokens,
            self._request_success,
            self._ttft,
            self._inter_token_latency,
            self._e2e_latency,
            self._queue_time,
        ):
            family.clear()
        self.model_name = model_name
        self.scheduler_stats.model_name = model_name
        self.prompt_tokens = self._prompt_tokens.labels(model_name)
        self.generation_tokens = self._generation_tokens.labels(model_name)
        self.ttft = self._ttft.labels(model_name)
        self.inter_token_latency = self._inter_token_latency.labels(model_name)
        self.e2e_latency = self._e2e_latency.labels(model_name)
        self.queue_time = self._queue_time.labels(model_name)

    def record_finished(
        self, arrival: float, prompt_tokens: int, generation_tokens: int, finish_reasons: list[str]
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self._request_success.labels(self.model_name, reason).inc()
        self.e2e_latency.observe(time.monotonic() - arrival)
        from splitserve.gateway.request_observer import current_observer

        observer = current_observer()
        if observer is not None:
            observer.finish(prompt_tokens, generation_tokens, finish_reasons)

    async def refresh_scheduler_stats(self, scheduler, timeout_s: float = 5.0) -> None:
        """Fetch the scheduler's figures for this scrape; a failed fetch drops them."""
        try:
            self.scheduler_stats.stats = await scheduler.GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=timeout_s
            )
        except Exception as exc:  # the scrape still serves the gateway's own metrics
            logger.warning("scheduler stats unavailable for /metrics: %s", exc)
            self.scheduler_stats.stats = None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts responses by route template and status (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, known_paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            endpoint = path if path in self.known_paths else "other"
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
