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
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_max_num_generation_tokens": "histogram",
    "vllm:gpu_cache_usage_perc": "gauge",
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


def _spec(request_id: str, prompt_len: int, max_tokens: int | None, phases=None):
    from splitserve.gateway.generation import SequenceSpec
    from splitserve.protos import common_pb2

    sp = common_pb2.SamplingParams()
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    spec = SequenceSpec(request_id, list(range(prompt_len)), sp)
    if phases is not None:
        spec.prefill_time_s, spec.decode_time_s = phases
    return spec


def test_buckets_1_2_5():
    from splitserve.gateway.metrics import buckets_1_2_5

    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4096)[-1] == 2000
    assert buckets_1_2_5(1) == (1,)


def test_token_buckets_follow_the_context_length():
    m = GatewayMetrics("x")
    m.set_model_name("tiny", 64)
    m.request_prompt_tokens.observe(3)
    fam = families(m)["vllm:request_prompt_tokens"]
    les = [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")]
    assert les == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "+Inf"]


def test_sequences_recorded_per_vllm_request():
    """Per sequence (vLLM's child requests): tokens, max_tokens, phase times, time to first
    token and e2e latency; per prompt
    (vLLM's parent request): n and the most tokens one of its sequences produced."""
    from splitserve.gateway.generation import SequenceDelta
    from splitserve.gateway.request_observer import RequestObserver

    m = GatewayMetrics("tiny")
    obs = RequestObserver(m, "tiny", "/v1/completions")
    specs = [
        _spec("cmpl-1-0-0", 7, 5, (0.25, 1.0)),
        _spec("cmpl-1-0-1", 7, 5, (0.5, 2.0)),
        _spec("cmpl-1-1-0", 4, None, None),  # a second prompt, n=1, no max_tokens, no phases
    ]
    obs.start(specs)
    for index, n_tokens in ((0, 3), (1, 5), (0, 1), (2, 2)):
        obs.on_delta(index, SequenceDelta("", list(range(n_tokens)), [], 7))
    m.record_finished(obs.arrival, 7 + 7 + 4, 4 + 5 + 2, ["length"] * 3)
    fams = families(m)

    def hist(name: str) -> tuple[float, float]:
        count = value(fams, name, name + "_count", model_name="tiny")
        return count, value(fams, name, name + "_sum", model_name="tiny")

    # Time to first token and e2e latency per sequence too (vLLM's child requests).
    assert hist("vllm:time_to_first_token_seconds")[0] == 3
    assert hist("vllm:e2e_request_latency_seconds")[0] == 3
    assert hist("vllm:request_prompt_tokens") == (3, 7 + 7 + 4)
    assert hist("vllm:request_generation_tokens") == (3, 4 + 5 + 2)
    assert hist("vllm:request_params_max_tokens") == (2, 10)
    assert hist("vllm:request_params_n") == (2, 2 + 1)
    assert hist("vllm:request_max_num_generation_tokens") == (2, 5 + 2)
    assert hist("vllm:request_prefill_time_seconds") == (2, 0.75)
    assert hist("vllm:request_decode_time_seconds") == (2, 3.0)
    assert hist("vllm:request_inference_time_seconds") == (2, 3.75)
    # Decode time over the gaps after the first token: 1.0 / 3 and 2.0 / 4.
    count, total = hist("vllm:request_time_per_output_token_seconds")
    assert count == 2 and abs(total - (1.0 / 3 + 2.0 / 4)) < 1e-9
    # Recorded once: a second finish adds nothing.
    obs.finish(0, 0, [])
    assert families(m)["vllm:request_params_n"].samples == fams["vllm:request_params_n"].samples


def test_dashboard_aliases_mirror_the_current_names():
    m = GatewayMetrics("tiny")
    m.scheduler_stats.stats = stats(num_free_blocks=150)
    m.inter_token_latency.observe(0.03)
    m.inter_token_latency.observe(0.2)
    fams = families(m)
    itl = {
        (s.name.replace("inter_token_latency", "X"), tuple(sorted(s.labels.items()))): s.value
        for s in fams["vllm:inter_token_latency_seconds"].samples
    }
    tpot = {
        (s.name.replace("time_per_output_token", "X"), tuple(sorted(s.labels.items()))): s.value
        for s in fams["vllm:time_per_output_token_seconds"].samples
    }
    assert fams["vllm:time_per_output_token_seconds"].type == "histogram"
    assert itl == tpot and len(itl) > 3
    old = value(fams, "vllm:gpu_cache_usage_perc", "vllm:gpu_cache_usage_perc", model_name="tiny")
    assert old == 0.25


def test_iteration_tokens_and_info_gauges():
    m = GatewayMetrics("tiny")
    m.scheduler_stats.stats = stats(
        num_free_blocks=200,
        block_size=16,
        enable_prefix_caching=True,
        iteration_tokens_bounds=[1, 8],
        iteration_tokens_bucket_counts=[4, 6, 7],
        iteration_tokens_sum=50,
    )
    fams = families(m)
    it = fams["vllm:iteration_tokens_total"]
    assert it.type == "histogram"
    buckets = {
        s.labels["le"]: s.value
        for s in it.samples
        if s.name == "vllm:iteration_tokens_total_bucket"
    }
    assert buckets == {"1.0": 4, "8.0": 6, "+Inf": 7}
    assert (
        value(
            fams,
            "vllm:iteration_tokens_total",
            "vllm:iteration_tokens_total_count",
            model_name="tiny",
        )
        == 7
    )
    assert (
        value(
            fams,
            "vllm:iteration_tokens_total",
            "vllm:iteration_tokens_total_sum",
            model_name="tiny",
        )
        == 50
    )
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels == {
        "block_size": "16",
        "num_gpu_blocks": "200",
        "enable_prefix_caching": "True",
        "engine": "0",
    }
    assert "vllm:lora_requests_info" not in fams  # LoRA off
    m.scheduler_stats.stats = stats(
        max_loras=2, running_lora_adapters=["a", "b"], waiting_lora_adapters=["c"]
    )
    before = time.time()
    (lora,) = families(m)["vllm:lora_requests_info"].samples
    assert lora.labels == {
        "max_lora": "2",
        "running_lora_adapters": "a,b",
        "waiting_lora_adapters": "c",
    }
    assert lora.value >= before


def test_eplb_figures_appear_only_when_the_scheduler_reports_them():
    m = GatewayMetrics("tiny")
    m.scheduler_stats.stats = stats(num_free_blocks=200)
    assert not [name for name in families(m) if "eplb" in name]
    m.scheduler_stats.stats = stats(
        num_free_blocks=200, eplb_num_rebalances=3, eplb_balancedness=0.875
    )
    fams = families(m)
    assert fams["splitserve:eplb_rebalances"].type == "counter"
    name = "splitserve:eplb_rebalances"
    assert value(fams, name, name + "_total", model_name="tiny") == 3
    name = "splitserve:eplb_balancedness"
    assert fams[name].type == "gauge"
    assert value(fams, name, name, model_name="tiny") == 0.875
