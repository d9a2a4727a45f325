"""Traces and metrics of the real stack: one OTLP trace per request across the four services,
and vLLM's Prometheus metrics moving by exact amounts."""

from __future__ import annotations

import os
import secrets
import threading
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from .conftest import Server, wait_for


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver: keeps every span with its service.name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, object]] = []

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    self.spans.extend((service, span) for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    recv = _Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(recv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    recv.endpoint = f"http://127.0.0.1:{port}"
    yield recv
    server.stop(0)


def _traced_stack(tiny_model, receiver, log_dir, extra: list[str]) -> Server:
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
    }
    saved = {k: os.environ.get(k) for k in [*env, "OTEL_SERVICE_NAME"]}
    os.environ.update(env)
    os.environ.pop("OTEL_SERVICE_NAME", None)
    try:
        return Server(
            tiny_model,
            ["--otlp-traces-endpoint", receiver.endpoint, *extra],
            log_dir / "traced.log",
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def traced_server(tiny_model, receiver, tmp_path_factory):
    s = _traced_stack(
        tiny_model, receiver, tmp_path_factory.mktemp("logs"), ["--collect-detailed-traces", "all"]
    )
    yield s
    s.stop()


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[a.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[a.key] = getattr(v, kind)
    return out


SERVER = trace_pb2.Span.SPAN_KIND_SERVER

SEQ_ID = "{}-0-0"
"""The scheduler-side id of a request's only sequence (gateway/sampling.py)."""

EXPECTED = {
    # The gateway detokenizes generated tokens itself (one output stream from the scheduler).
    "splitserve-gateway": {"llm_request", "detokenize"},
    "splitserve-tokenizer": {"tokenize"},
    "splitserve-scheduler": {"scheduler.queued", "scheduler.prefill", "scheduler.decode"},
    "splitserve-worker": {"worker.request", "worker.execute_step"},
}


def test_one_trace_across_all_services(traced_server, receiver):
    trace_id = secrets.token_bytes(16)
    parent_id = secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{parent_id.hex()}-01"
    r = httpx.post(
        traced_server.url + "/v1/completions",
        headers={"traceparent": traceparent},
        json={
            "model": traced_server.model,
            "prompt": "hello world",
            "max_tokens": 4,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()

    def complete() -> bool:
        names: dict[str, set[str]] = {}
        for svc, span in receiver.of_trace(trace_id):
            names.setdefault(svc, set()).add(span.name)
        return all(want <= names.get(svc, set()) for svc, want in EXPECTED.items())

    def linked() -> bool:
        # Spans arrive as each process ends them: wait until every parent link resolves.
        found = receiver.of_trace(trace_id)
        ids = {s.span_id for _, s in found} | {parent_id}
        return complete() and all(s.parent_span_id in ids for _, s in found)

    try:
        wait_for(linked, 30, "spans of every service in the request's trace, all linked")
    finally:
        spans = receiver.of_trace(trace_id)
        for svc, sp in spans:  # shown when the test fails
            print(svc, sp.name, sp.span_id.hex(), sp.parent_span_id.hex())
    by_id = {s.span_id: (svc, s) for svc, s in spans}
    # Housekeeping RPCs stay out of the traces (serve polled /health, hence Health/Check,
    # throughout start-up; those spans would have been exported by now).
    with receiver.lock:
        names = {s.name for _, s in receiver.spans}
    assert not [n for n in names if n.startswith("/grpc.health.v1.Health/")], names

    def ancestors(span) -> list[tuple[str, object]]:
        chain = []
        while span.parent_span_id in by_id:
            svc, span = by_id[span.parent_span_id]
            chain.append((svc, span))
        assert span.parent_span_id == parent_id, "the chain must end at the client's span"
        return chain

    def one(service: str, name: str):
        found = [s for svc, s in spans if svc == service and s.name == name]
        assert len(found) == 1, (service, name, len(found))
        return found[0]

    # The gateway's request span sits under the HTTP server span, itself under the client's.
    llm = one("splitserve-gateway", "llm_request")
    detok = one("splitserve-gateway", "detokenize")
    assert detok.parent_span_id == llm.span_id and _attrs(detok)["splitserve.num_tokens"] == 4
    llm_chain = ancestors(llm)
    assert llm_chain and llm_chain[-1][0] == "splitserve-gateway"
    attrs = _attrs(llm)
    usage = body["usage"]
    assert attrs["gen_ai.request.id"] == body["id"]
    assert attrs["gen_ai.request.model"] == traced_server.model
    assert attrs["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.completion_tokens"] == usage["completion_tokens"] == 4
    assert attrs["gen_ai.request.max_tokens"] == 4
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert attrs["gen_ai.request.seed"] == 3
    assert attrs["gen_ai.request.n"] == 1
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    e2e, ttft, queue = (
        attrs["gen_ai.latency.e2e"],
        attrs["gen_ai.latency.time_to_first_token"],
        attrs["gen_ai.latency.time_in_queue"],
    )
    assert 0 <= queue <= ttft <= e2e
    assert e2e == pytest.approx((llm.end_time_unix_nano - llm.start_time_unix_nano) / 1e9, abs=1e-6)

    # Every other service's spans descend from the gateway's request span, through the
    # gRPC client span (gateway) and server span (their own service).
    for service, names in EXPECTED.items():
        if service == "splitserve-gateway":
            continue
        for name in names:
            for span in [s for svc, s in spans if svc == service and s.name == name]:
                chain = ancestors(span)
                # Direct parent: the service's own gRPC server span (the worker's steps hang
                # under the scheduler's Generate span, checked below).
                own = "splitserve-scheduler" if service == "splitserve-worker" else service
                assert chain[0][0] == own and chain[0][1].kind == SERVER, name
                assert any(s.span_id == llm.span_id for _, s in chain), name
    rid = lambda s: _attrs(s)["gen_ai.request.id"]  # noqa: E731
    queued = one("splitserve-scheduler", "scheduler.queued")
    prefill = one("splitserve-scheduler", "scheduler.prefill")
    decode = one("splitserve-scheduler", "scheduler.decode")
    assert rid(queued) == rid(prefill) == rid(decode) == SEQ_ID.format(body["id"])
    assert queued.end_time_unix_nano == prefill.start_time_unix_nano
    assert prefill.end_time_unix_nano == decode.start_time_unix_nano
    assert _attrs(prefill)["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert _attrs(decode)["gen_ai.usage.completion_tokens"] == 4
    # Detailed traces: one worker span per step of this request (4 tokens: 4 steps).
    steps = [
        s for svc, s in spans if svc == "splitserve-worker" and s.name == "worker.execute_step"
    ]
    assert len(steps) == 4
    generate_server = by_id[queued.parent_span_id][1]
    assert all(s.parent_span_id == generate_server.span_id for s in steps)
    _check_worker_request_span(spans, usage, generate_server)


def _check_worker_request_span(spans, usage: dict, generate_server) -> None:
    """The worker's one span of a 4-token request: one prefill step, three decode steps."""
    stay = next(s for svc, s in spans if svc == "splitserve-worker" and s.name == "worker.request")
    assert stay.parent_span_id == generate_server.span_id
    attrs = _attrs(stay)
    assert attrs["splitserve.rank"] == 0
    assert (
        attrs["splitserve.request.prefill_steps"],
        attrs["splitserve.request.decode_steps"],
    ) == (
        1,
        3,
    )
    assert attrs["splitserve.request.num_scheduled_tokens"] == usage["prompt_tokens"] + 3
    assert attrs["splitserve.request.resumed_after_preemption"] is False


def test_default_tracing_has_one_worker_span_per_request(tiny_model, receiver, tmp_path):
    """Without --collect-detailed-traces: spans from all four services under the client's
    traceparent, the worker's being its one `worker.request` span (no per-step spans)."""
    s = _traced_stack(tiny_model, receiver, tmp_path, [])
    try:
        trace_id = secrets.token_bytes(16)
        traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
        r = httpx.post(
            s.url + "/v1/completions",
            headers={"traceparent": traceparent},
            json={"model": s.model, "prompt": "hello world", "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text

        def services() -> set[str]:
            return {svc for svc, _ in receiver.of_trace(trace_id)}

        wait_for(lambda: len(services()) == 4, 30, "spans from all four services")
        spans = receiver.of_trace(trace_id)
        worker = [sp.name for svc, sp in spans if svc == "splitserve-worker"]
        assert worker == ["worker.request"], worker
        queued = next(sp for _, sp in spans if sp.name == "scheduler.queued")
        by_id = {sp.span_id: sp for _, sp in spans}
        _check_worker_request_span(spans, r.json()["usage"], by_id[queued.parent_span_id])
    finally:
        s.stop()


def test_streamed_request_span_ends_with_the_stream(traced_server, receiver):
    trace_id = secrets.token_bytes(16)
    traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
    with httpx.stream(
        "POST",
        traced_server.url + "/v1/chat/completions",
        headers={"traceparent": traceparent},
        json={
            "model": traced_server.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "ignore_eos": True,
        },
        timeout=60,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"

    def request_span():
        found = [s for svc, s in receiver.of_trace(trace_id) if s.name == "llm_request"]
        return found[0] if found else None

    wait_for(lambda: request_span() is not None, 30, "the streamed request's span")
    span = request_span()
    attrs = _attrs(span)
    assert span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    assert attrs["gen_ai.usage.completion_tokens"] == 3
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["http.route"] == "/v1/chat/completions"


def test_chat_with_a_constraint_traces_template_and_compile(traced_server, receiver):
    """A chat request's template render is its `tokenize` span; a constrained request gets a
    `compile_grammar` span for the gateway's compile and one for the scheduler's (a cache
    hit), each under its caller's gRPC span in the request's trace."""
    trace_id = secrets.token_bytes(16)
    traceparent = f"00-{trace_id.hex()}-{secrets.token_bytes(8).hex()}-01"
    r = httpx.post(
        traced_server.url + "/v1/chat/completions",
        headers={"traceparent": traceparent},
        json={
            "model": traced_server.model,
            "messages": [{"role": "user", "content": "pick"}],
            "max_tokens": 8,
            "guided_choice": ["left", "right"],
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("left", "right")

    def tokenizer_spans() -> list:
        return [s for svc, s in receiver.of_trace(trace_id) if svc == "splitserve-tokenizer"]

    def done() -> bool:
        names = [s.name for s in tokenizer_spans()]
        return "compile_grammar" in names and "tokenize" in names

    # One compile: the gateway's Prepare call; the scheduler no longer asks again.
    wait_for(done, 30, "the tokenizer's tokenize and compile_grammar spans")
    compiles = [_attrs(s) for s in tokenizer_spans() if s.name == "compile_grammar"]
    assert [a["splitserve.grammar.kind"] for a in compiles] == ["choice"]
    assert [a["splitserve.grammar.cache_hit"] for a in compiles] == [False]
    (tok,) = [s for s in tokenizer_spans() if s.name == "tokenize"]
    assert _attrs(tok)["splitserve.chat_template"] is True
    assert _attrs(tok)["splitserve.num_tokens"] > 0


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_move_by_the_right_amounts(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = server.model
    m = f'{{model_name="{model}"}}'
    before = _scrape(server.url)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 30)), [40, 41, 42]]
    max_tokens = [3, 5, 2]
    for prompt, n_out in zip(prompts, max_tokens):
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=n_out,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == n_out
    # One streamed request too: its figures are recorded when the stream ends.
    stream = client.completions.create(
        model=model, prompt=[3, 4, 5, 6], max_tokens=4, stream=True, extra_body={"ignore_eos": True}
    )
    assert len([c for c in stream if c.choices and c.choices[0].text is not None]) >= 1
    after = _scrape(server.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(f"vllm:prompt_tokens_total{m}") == 5 + 20 + 3 + 4
    assert delta(f"vllm:generation_tokens_total{m}") == 3 + 5 + 2 + 4
    reason = f'{{finished_reason="length",model_name="{model}"}}'
    assert delta(f"vllm:request_success_total{reason}") == 4
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"vllm:{hist}_seconds_count{m}") == 4, hist
        assert delta(f"vllm:{hist}_seconds_sum{m}") > 0, hist
        inf = f'vllm:{hist}_seconds_bucket{{le="+Inf",model_name="{model}"}}'
        assert delta(inf) == 4, hist
    # One gap per token after the first, per sequence.
    assert delta(f"vllm:inter_token_latency_seconds_count{m}") == 2 + 4 + 1 + 3
    # The scheduler's figures: every prompt looked up in the prefix cache, in tokens (a
    # request is looked up when admitted; none of these was preempted).
    assert delta(f"vllm:prefix_cache_queries_total{m}") == 5 + 20 + 3 + 4
    assert 0 <= delta(f"vllm:prefix_cache_hits_total{m}") <= 5 + 20 + 3 + 4
    assert delta(f"vllm:num_preemptions_total{m}") == 0
    assert after[f"vllm:num_requests_running{m}"] == 0
    assert after[f"vllm:num_requests_waiting{m}"] == 0
    # Idle: only blocks kept for the prefix cache count as used, never more than all.
    assert 0.0 <= after[f"vllm:kv_cache_usage_perc{m}"] <= 1.0


def test_no_endpoint_installs_nothing():
    """Without --otlp-traces-endpoint no provider, exporter or instrumentation is set up."""
    import subprocess
    import sys

    code = (
        "import grpc, grpc.aio; from opentelemetry import trace;"
        "from splitserve.common.tracing import setup_tracing, enabled;"
        "f = grpc.aio.server; assert setup_tracing('x', None) is False and not enabled();"
        "assert grpc.aio.server is f;"
        "print(type(trace.get_tracer_provider()).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ProxyTracerProvider"


def _families(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_vllm_request_histograms_move_by_exact_amounts(server):
    """One request, n=2, max_tokens=5, a 9-token prompt: each of vLLM's per-request families
    moves by what vLLM would record (per sequence, or per prompt for n and max generation
    tokens); tokens per step add up to what the steps computed."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = server.model
    m = f'{{model_name="{model}"}}'
    prompt = [21, 22, 23, 24, 25, 26, 27, 28, 29]  # under one block: no prefix-cache hit
    before, stats_before = _scrape(server.url), server.scheduler_stats()
    out = client.completions.create(
        model=model,
        prompt=prompt,
        n=2,
        max_tokens=5,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.finish_reason for c in out.choices] == ["length", "length"]
    assert out.usage.completion_tokens == 10
    after, stats_after = _scrape(server.url), server.scheduler_stats()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def bucket(family: str, le: str) -> float:
        return delta(f'vllm:{family}_bucket{{le="{le}",model_name="{model}"}}')

    # Per sequence (vLLM's child requests).
    assert delta(f"vllm:request_prompt_tokens_count{m}") == 2
    assert delta(f"vllm:request_prompt_tokens_sum{m}") == 2 * 9
    assert bucket("request_prompt_tokens", "5.0") == 0
    assert bucket("request_prompt_tokens", "10.0") == 2
    assert delta(f"vllm:request_generation_tokens_count{m}") == 2
    assert delta(f"vllm:request_generation_tokens_sum{m}") == 2 * 5
    assert bucket("request_generation_tokens", "2.0") == 0
    assert bucket("request_generation_tokens", "5.0") == 2
    assert delta(f"vllm:request_params_max_tokens_count{m}") == 2
    assert delta(f"vllm:request_params_max_tokens_sum{m}") == 2 * 5
    # Per prompt (vLLM's parent request).
    assert delta(f"vllm:request_params_n_count{m}") == 1
    assert delta(f"vllm:request_params_n_sum{m}") == 2
    assert bucket("request_params_n", "1.0") == 0
    assert bucket("request_params_n", "2.0") == 1
    assert delta(f"vllm:request_max_num_generation_tokens_count{m}") == 1
    assert delta(f"vllm:request_max_num_generation_tokens_sum{m}") == 5
    # Phase times, one per sequence; inference = prefill + decode, within the request's e2e.
    times = {}
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"vllm:request_{phase}_time_seconds_count{m}") == 2, phase
        times[phase] = delta(f"vllm:request_{phase}_time_seconds_sum{m}")
        assert times[phase] >= 0, phase
    assert times["decode"] > 0  # four more tokens came after the first
    assert abs(times["inference"] - (times["prefill"] + times["decode"])) < 1e-6
    assert times["prefill"] <= times["inference"] and times["decode"] <= times["inference"]
    # Per sequence: its decode time over the 4 gaps after its first token.
    assert delta(f"vllm:request_time_per_output_token_seconds_count{m}") == 2
    tpot = delta(f"vllm:request_time_per_output_token_seconds_sum{m}")
    assert abs(tpot - times["decode"] / 4) < 1e-6
    # e2e latency and time to first token per sequence as well; each sequence's phases
    # fall within its own e2e latency.
    e2e = delta(f"vllm:e2e_request_latency_seconds_sum{m}")
    assert delta(f"vllm:e2e_request_latency_seconds_count{m}") == 2
    assert delta(f"vllm:time_to_first_token_seconds_count{m}") == 2
    assert times["queue"] + times["inference"] <= e2e
    # Tokens per step: both prompts computed (less any prefix-cache hit), then one input
    # token per later output token; one observation per step the scheduler ran.
    hits = delta(f"vllm:prefix_cache_hits_total{m}")
    assert delta(f"vllm:num_preemptions_total{m}") == 0
    assert delta(f"vllm:iteration_tokens_total_sum{m}") == 2 * 9 - hits + 2 * (5 - 1)
    steps = stats_after.num_steps - stats_before.num_steps
    assert steps >= 5  # a prefill step, then at least four decode steps
    assert delta(f"vllm:iteration_tokens_total_count{m}") == steps
    assert bucket("iteration_tokens_total", "+Inf") == steps


def test_cache_config_info_names_the_configured_cache(server):
    stats = server.scheduler_stats()
    (sample,) = _families(server.url)["vllm:cache_config_info"].samples
    assert sample.value == 1
    assert sample.labels["block_size"] == "16"  # --block-size 16 (conftest.py)
    assert sample.labels["num_gpu_blocks"] == str(stats.num_total_blocks)
    assert int(sample.labels["num_gpu_blocks"]) > 0
    assert sample.labels["enable_prefix_caching"] == "True"


# The metric names that the panels of vLLM's example Grafana dashboard
# (examples/online_serving/prometheus_grafana/grafana.json) query, with the names its newer
# revisions use instead of the deprecated ones. Every panel filters on model_name.
DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:inter_token_latency_seconds_sum",
    "vllm:inter_token_latency_seconds_count",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
)


def test_every_dashboard_series_has_data(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    client.completions.create(
        model=server.model, prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True}
    )
    present: dict[str, list[dict]] = {}
    for family in _families(server.url).values():
        for s in family.samples:
            present.setdefault(s.name, []).append(s.labels)
    for name in DASHBOARD_SERIES:
        labels = present.get(name)
        assert labels, f"{name} is missing from /metrics"
        assert any(lb.get("model_name") == server.model for lb in labels), name
    reasons = {lb.get("finished_reason") for lb in present["vllm:request_success_total"]}
    assert "length" in reasons  # the Finish Reason panel sums by finished_reason
