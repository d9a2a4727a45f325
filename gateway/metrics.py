"""Prometheus metrics of the gateway, on a registry of its own (one per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_TTFT_BUCKETS = (
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
)
_LATENCY_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
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
)


class GatewayMetrics:
    """Request counts, token counters and latency histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "splitserve_http_requests",
            "HTTP requests by route and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "splitserve_prompt_tokens",
            "Prompt tokens of finished requests.",
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "splitserve_generation_tokens",
            "Generated tokens of finished requests.",
            registry=self.registry,
        )
        self.request_success = Counter(
            "splitserve_request_success",
            "Finished sequences by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "splitserve_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def record_finished(
        self, arrival: float, prompt_tokens: int, generation_tokens: int, finish_reasons: list[str]
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self.request_success.labels(reason).inc()
        self.e2e_latency.observe(time.monotonic() - arrival)

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
