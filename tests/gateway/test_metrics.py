"""The gateway's /metrics: vLLM's names and types, labelled model_name; the scheduler's
cumulative figures exported as counters carrying its totals."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from splitserve.gateway.metrics import GatewayMetrics
from splitserve.protos import scheduler_pb2

VLLM_TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}


def families(metrics: GatewayMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(fams: dict, name: str, sample: str, **labels) -> float:
    return next(s.value for s in fams[name].samples if s.name == sample and s.labels == labels)


def stats(**kw) -> scheduler_pb2.SchedulerStats:
    return scheduler_pb2.SchedulerStats(num_total_blocks=200, **kw)


def test_names_types_and_label():
    m = GatewayMetrics("placeholder")
    m.set_model_name("tiny")  # renamed at start-up, before any request
    m.scheduler_stats.stats = stats(num_free_blocks=150, num_running=3, num_waiting=2)
    m.record_finished(time.monotonic(), 7, 5, ["stop", "length"])
    fams = families(m)
    for name, kind in VLLM_TYPES.items():
        assert fams[name].type == kind, name
        assert all(s.labels.get("model_name") == "tiny" for s in fams[name].samples), name
    assert (
        value(fams, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", model_name="tiny")
        == 0.25
    )
    assert (
        value(fams, "vllm:num_requests_running", "vllm:num_requests_running", model_name="tiny")
        == 3
    )
    assert (
        value(fams, "vllm:num_requests_waiting", "vllm:num_requests_waiting", model_name="tiny")
        == 2
    )
    assert value(fams, "vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name="tiny") == 7
    assert (
        value(fams, "vllm:generation_tokens", "vllm:generation_tokens_total", model_name="tiny")
        == 5
    )
    for reason in ("stop", "length"):
        got = value(
            fams,
            "vllm:request_success",
            "vllm:request_success_total",
            model_name="tiny",
            finished_reason=reason,
        )
        assert got == 1
    assert not any("placeholder" in str(s.labels) for f in fams.values() for s in f.samples)


def test_scheduler_counters_follow_its_totals():
    m = GatewayMetrics("tiny")
    m.scheduler_stats.stats = stats(
        num_free_blocks=200, num_preemptions=4, prefix_cache_queries=96, prefix_cache_hits=32
    )
    before = families(m)
    m.scheduler_stats.stats = stats(
        num_free_blocks=200, num_preemptions=6, prefix_cache_queries=160, prefix_cache_hits=80
    )
    after = families(m)
    for name, moved in (
        ("vllm:num_preemptions", 2),
        ("vllm:prefix_cache_queries", 64),
        ("vllm:prefix_cache_hits", 48),
    ):
        total = name + "_total"
        delta = value(after, name, total, model_name="tiny") - value(
            before, name, total, model_name="tiny"
        )
        assert delta == moved, name
    # Without an answer from the scheduler its figures are absent, not stale or zero.
    m.scheduler_stats.stats = None
    assert "vllm:num_preemptions" not in families(m)
