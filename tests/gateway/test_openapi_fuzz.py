"""CHECKLIST row 26: property-based fuzzing of the gateway's own OpenAPI schema.

schemathesis reads FastAPI's /openapi.json and sends generated requests, valid and invalid,
to every operation of the gateway app, in process over ASGI, with the in-test fakes behind it
(no model). Every response must be a non-5xx that conforms to the schema: a declared status
code, content type and body; a request the schema says is invalid must be refused.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from splitserve.gateway.app import build_app
from splitserve.gateway.config import GatewayConfig

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = int(os.environ.get("SPLITSERVE_FUZZ_EXAMPLES", "25"))
"""Examples per operation and mode; CI keeps it small, a deeper local run raises it."""


@pytest.fixture(scope="module")
def schema(fakes):
    app = build_app(
        GatewayConfig(
            scheduler_address=fakes.scheduler_address,
            tokenizer_address=fakes.tokenizer_address,
            served_model_name=["fake-model"],
            startup_timeout_s=10,
            # NOTE: a generated request that happens to hang (#hang in a prompt) must end.
            request_timeout_s=10,
        )
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema):
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/health"}
    return ops


def _has_inputs(op) -> bool:
    return any(len(container) for container in (op.body, op.query, op.headers, op.path_parameters))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_schema_fuzz(schema, mode):
    for op in _operations(schema):
        if mode is GenerationMode.NEGATIVE and not _has_inputs(op):
            continue  # nothing to make invalid (GET /health, /v1/models, ...)

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except Exception as exc:
            exc.add_note(f"operation: {op.method.upper()} {op.path} ({mode.value})")
            raise
