"""OpenTelemetry tracing shared by every service.

`setup_tracing(service, endpoint)` installs a tracer provider with a batching OTLP exporter and
instruments gRPC (clients and servers, sync and asyncio) and, on request, FastAPI. Without an
endpoint it installs nothing: no exporter, no instrumentation, and `enabled()` stays False so
callers skip building spans altogether.

The exporter protocol follows the standard variables: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else
OTEL_EXPORTER_OTLP_PROTOCOL, `grpc` (the default, as vLLM) or `http/protobuf`; the rest
(OTEL_EXPORTER_OTLP_HEADERS, ..._INSECURE, ..._TIMEOUT, OTEL_BSP_SCHEDULE_DELAY, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES) is read by the SDK itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
DETAILED_TRACE_MODULES = ("all", "model", "worker")
"""vLLM's --collect-detailed-traces values; `model` and `worker` both mean the worker's
per-step spans here (the model forward is the worker's step)."""

_state: dict[str, object] = {"enabled": False, "provider": None}


def exporter_protocol() -> str:
    """The OTLP protocol the standard variables ask for (default grpc)."""
    value = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if value not in PROTOCOLS:
        raise ValueError(
            f"OTLP traces protocol must be one of {', '.join(PROTOCOLS)}, got {value!r} "
            "(from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL)"
        )
    return value


def check_endpoint(endpoint: str | None) -> None:
    """Config-time check of an --otlp-traces-endpoint value (and of the protocol variable)."""
    if endpoint is None:
        return
    if not endpoint.strip():
        raise ValueError("otlp_traces_endpoint must not be empty when set")
    protocol = exporter_protocol()
    if protocol == "http/protobuf" and not endpoint.startswith(("http://", "https://")):
        raise ValueError(
            f"otlp_traces_endpoint must be an http(s):// URL for the http/protobuf protocol, "
            f"got {endpoint!r}"
        )


def parse_detailed_traces(value: str | None, endpoint: str | None) -> frozenset[str]:
    """The modules of --collect-detailed-traces (comma-separated); needs an endpoint."""
    if value is None:
        return frozenset()
    parts = frozenset(p.strip() for p in value.split(",") if p.strip())
    bad = sorted(parts - set(DETAILED_TRACE_MODULES))
    if bad or not parts:
        raise ValueError(
            f"collect_detailed_traces must be a comma-separated subset of "
            f"{', '.join(DETAILED_TRACE_MODULES)}, got {value!r}"
        )
    if endpoint is None:
        raise ValueError(
            "collect_detailed_traces needs otlp_traces_endpoint: detailed traces go to a "
            "collector and there is none"
        )
    return parts


def enabled() -> bool:
    """Whether this process exports spans (setup_tracing ran with an endpoint)."""
    return bool(_state["enabled"])


def setup_tracing(service: str, endpoint: str | None) -> bool:
    """Install the OTLP exporter and gRPC instrumentation for `service`; False without endpoint.

    Call it before any gRPC channel or server is created (the instrumentation wraps their
    factories).
    """
    if endpoint is None or _state["enabled"]:
        return bool(_state["enabled"])
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        GrpcInstrumentorClient,
        GrpcInstrumentorServer,
    )
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    check_endpoint(endpoint)
    protocol = exporter_protocol()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    # NOTE: the exporter's own gRPC channel is created above, before the client
    # instrumentation, so exporting spans does not itself produce spans.
    for instrumentor in (
        GrpcInstrumentorClient,
        GrpcAioInstrumentorClient,
        GrpcInstrumentorServer,
        GrpcAioInstrumentorServer,
    ):
        instrumentor(filter_=_traced_rpcs()).instrument()
    _state["enabled"] = True
    _state["provider"] = provider
    logger.info("exporting traces of %s to %s over OTLP/%s", name, endpoint, protocol)
    return True


def _traced_rpcs():
    """Every RPC but the housekeeping ones: health probes, the stats a /metrics scrape reads,
    and the scheduler -> worker Execute stream, which lives as long as the process (its steps
    get spans of their own with --collect-detailed-traces)."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(
            filters.health_check(),
            filters.all_of(
                filters.service_name("splitserve.scheduler.v1.SchedulerService"),
                filters.method_name("GetStats"),
            ),
            filters.all_of(
                filters.service_name("splitserve.worker.v1.WorkerService"),
                filters.method_name("Execute"),
            ),
        )
    )


def shutdown() -> None:
    """Flush and stop the exporter (also registered at exit by the SDK)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]


def instrument_fastapi(app) -> None:
    """Server spans for every HTTP request; an incoming `traceparent` becomes their parent."""
    if not enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # The ASGI receive/send sub-spans say nothing the request span does not.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="health,metrics", exclude_spans=["receive", "send"]
    )


def get_tracer(name: str):
    from opentelemetry import trace

    return trace.get_tracer(name)


def inject_current() -> dict[str, str]:
    """The current trace context as W3C headers (traceparent, tracestate)."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str]):
    """A context whose parent is the span named by W3C headers in `carrier`."""
    from opentelemetry import propagate

    return propagate.extract(dict(carrier))


def emit_span(
    tracer,
    name: str,
    parent_context,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """A finished span with explicit times (for work timed off the event loop)."""
    span = tracer.start_span(
        name, context=parent_context, start_time=start_ns, attributes=dict(attributes or {})
    )
    span.end(end_time=max(end_ns, start_ns))


class DetokenizeTrace:
    """The `detokenize` span of one sequence's (or one stream's) output work: its parent is
    the context current when it is made; `emit` closes it when that work is done."""

    __slots__ = ("scope", "parent", "start_ns", "request_id", "num_tokens")

    def __init__(self, scope: str, request_id: str = "") -> None:
        from opentelemetry import context

        self.scope = scope
        """The instrumentation scope (the module that does the work)."""
        self.parent = context.get_current()
        self.start_ns = time.time_ns()
        self.request_id = request_id
        self.num_tokens = 0

    def emit(self) -> None:
        emit_span(
            get_tracer(self.scope),
            "detokenize",
            self.parent,
            self.start_ns,
            time.time_ns(),
            {"gen_ai.request.id": self.request_id, "splitserve.num_tokens": self.num_tokens},
        )


def span(name: str, attributes: Mapping[str, object] | None = None):
    """A current span around a block when tracing is on; a no-op context otherwise."""
    if not enabled():
        return contextlib.nullcontext()
    return get_tracer("splitserve").start_as_current_span(name, attributes=dict(attributes or {}))
