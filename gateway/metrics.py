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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
DEFAULT_MAX_MODEL_LEN = 2048
"""Bounds the token-count buckets until the scheduler tells the real context length."""


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > limit:
                return tuple(out)
            out.append(value)
        scale *= 10


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
        # vLLM's older name of kv_cache_usage_perc, still read by its example dashboard.
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. "
            "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            usage,
        )
        yield from self._iteration_tokens(s)
        yield from self._info(s)
        if s.HasField("eplb_num_rebalances"):  # EPLB on; vLLM exports no metric of it
            yield counter(
                "splitserve:eplb_rebalances",
                "Expert rebalances (EPLB) performed.",
                s.eplb_num_rebalances,
            )
            yield gauge(
                "splitserve:eplb_balancedness",
                "Mean / max tokens per expert-parallel rank over the EPLB window, under the "
                "placement of the last rebalance (1 is perfectly even; 0 before the first).",
                s.eplb_balancedness,
            )

    def _iteration_tokens(self, s: scheduler_pb2.SchedulerStats):
        counts = s.iteration_tokens_bucket_counts
        if not counts:
            return  # a scheduler that does not count them
        if len(counts) != len(s.iteration_tokens_bounds) + 1:
            logger.warning(
                "scheduler stats: %d iteration-token buckets for %d bounds; not exported",
                len(counts),
                len(s.iteration_tokens_bounds),
            )
            return
        h = HistogramMetricFamily(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            labels=["model_name"],
        )
        les = [str(float(b)) for b in s.iteration_tokens_bounds] + ["+Inf"]
        h.add_metric([self.model_name], list(zip(les, counts)), s.iteration_tokens_sum)
        yield h

    def _info(self, s: scheduler_pb2.SchedulerStats):
        # Info-style gauges as vLLM shapes them: the facts are labels, without model_name.
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "enable_prefix_caching", "engine", "num_gpu_blocks"],
        )
        cache.add_metric(
            [
                str(s.block_size),
                str(s.enable_prefix_caching),
                "0",
                str(s.num_total_blocks),
            ],
            1.0,
        )
        yield cache
        if s.max_loras:  # vLLM has the family only when LoRA is on
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            # The value is when these adapter sets were seen (vLLM: the last update).
            lora.add_metric(
                [
                    str(s.max_loras),
                    ",".join(s.waiting_lora_adapters),
                    ",".join(s.running_lora_adapters),
                ],
                time.time(),
            )
            yield lora


class AliasCollector:
    """Exports a family again under another name (vLLM keeps deprecated names that its
    example dashboard still reads); costs nothing until a scrape."""

    def __init__(self, source, name: str, documentation: str) -> None:
        self.source = source
        self.name = name
        self.documentation = documentation

    def describe(self):
        return []

    def collect(self):
        for family in self.source.collect():
            alias = Metric(self.name, self.documentation, family.type, family.unit)
            for sample in family.samples:
                alias.samples.append(
                    sample._replace(name=self.name + sample.name[len(family.name) :])
                )
            yield alias


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

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=reg)

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
        self._ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._inter_token_latency = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self._e2e_latency = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._queue_time = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._inference_time = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._prefill_time = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._decode_time = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._request_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self._params_n = hist(
            "vllm:request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS
        )
        # vLLM's older name of the inter-token latency, still read by its example dashboard.
        reg.register(
            AliasCollector(
                self._inter_token_latency,
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds. "
                "DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            )
        )
        self._token_histograms: tuple[Histogram, ...] = ()
        self.max_model_len = 0
        self.set_model_name(model_name, DEFAULT_MAX_MODEL_LEN)

    def _init_token_histograms(self, max_model_len: int) -> None:
        """The histograms of token counts, bucketed 1-2-5 up to the context length."""
        for family in self._token_histograms:
            self.registry.unregister(family)
        m, reg = ["model_name"], self.registry
        buckets = buckets_1_2_5(max_model_len)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=reg)

        self._request_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed."
        )
        self._request_generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed."
        )
        self._max_num_generation_tokens = hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
        )
        self._params_max_tokens = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."
        )
        self._token_histograms = (
            self._request_prompt_tokens,
            self._request_generation_tokens,
            self._max_num_generation_tokens,
            self._params_max_tokens,
        )
        self.max_model_len = max_model_len

    def set_model_name(self, model_name: str, max_model_len: int | None = None) -> None:
        """The `model_name` label (the first served name, known once the services answered)
        and the context length that bounds the token-count buckets."""
        # NOTE: renamed at start-up only, before any request: nothing recorded is lost.
        if max_model_len and max_model_len != self.max_model_len:
            self._init_token_histograms(max_model_len)
        for family in (
            self._prompt_tokens,
            self._generation_tokens,
            self._request_success,
            self._ttft,
            self._inter_token_latency,
            self._e2e_latency,
            self._queue_time,
            self._inference_time,
            self._prefill_time,
            self._decode_time,
            self._request_tpot,
            self._params_n,
            *self._token_histograms,
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
        self.inference_time = self._inference_time.labels(model_name)
        self.prefill_time = self._prefill_time.labels(model_name)
        self.decode_time = self._decode_time.labels(model_name)
        self.request_tpot = self._request_tpot.labels(model_name)
        self.params_n = self._params_n.labels(model_name)
        self.request_prompt_tokens = self._request_prompt_tokens.labels(model_name)
        self.request_generation_tokens = self._request_generation_tokens.labels(model_name)
        self.max_num_generation_tokens = self._max_num_generation_tokens.labels(model_name)
        self.params_max_tokens = self._params_max_tokens.labels(model_name)

    def record_finished(
        self, arrival: float, prompt_tokens: int, generation_tokens: int, finish_reasons: list[str]
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self._request_success.labels(self.model_name, reason).inc()
        from splitserve.gateway.request_observer import current_observer

        observer = current_observer()
        if observer is None or not observer.num_sequences:
            self.e2e_latency.observe(time.monotonic() - arrival)
        if observer is not None:  # e2e latency per sequence, as vLLM per child request
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
