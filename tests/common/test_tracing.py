"""splitserve.common.tracing: the exporter protocol follows the standard OTEL variables, bad values
are config errors, and spans really leave over OTLP/HTTP (the gRPC path: tests/e2e)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from splitserve.common import tracing


def test_protocol_and_flag_checks(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    assert tracing.exporter_protocol() == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert tracing.exporter_protocol() == "http/protobuf"
    with pytest.raises(ValueError, match="http\\(s\\):// URL"):
        tracing.check_endpoint("collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")  # wins, unsupported
    with pytest.raises(ValueError, match="http/json"):
        tracing.check_endpoint("http://collector:4318/v1/traces")
    with pytest.raises(ValueError, match="must not be empty"):
        tracing.check_endpoint(" ")
    assert tracing.parse_detailed_traces("worker,model", "http://c:4317") == {"worker", "model"}
    with pytest.raises(ValueError, match="'gpu'"):
        tracing.parse_detailed_traces("gpu", "http://c:4317")
    with pytest.raises(ValueError, match="needs otlp_traces_endpoint"):
        tracing.parse_detailed_traces("all", None)
    assert tracing.parse_detailed_traces(None, None) == frozenset()


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        self.received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_spans_leave_over_otlp_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = (
        "import sys; from splitserve.common import tracing;"
        "assert tracing.setup_tracing('svc-http', sys.argv[1]) and tracing.enabled();"
        'exec(\'with tracing.span("hello", {"k": 7}):\\n    pass\');'
        "tracing.shutdown()"
    )
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    env.pop("OTEL_SERVICE_NAME", None)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    spans = [
        (rs.resource, span)
        for req in _Collector.received
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert [s.name for _, s in spans] == ["hello"]
    resource, span = spans[0]
    names = [a.value.string_value for a in resource.attributes if a.key == "service.name"]
    assert names == ["svc-http"]
    assert [(a.key, a.value.int_value) for a in span.attributes] == [("k", 7)]
