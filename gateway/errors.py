"""Exceptions to OpenAI error bodies: one mapping for every route, JSON or SSE."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

_GRPC_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class RequestError(Exception):
    """A request the gateway refuses or cannot serve, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    """A 400 naming the offending field."""
    return RequestError(400, message, param=param, code=code)


REQUEST_TIMEOUT_MESSAGE = "the request did not finish within the server's request timeout"


def request_timeout() -> RequestError:
    """The 504 of a request past its own deadline (--request-timeout-s)."""
    return RequestError(504, REQUEST_TIMEOUT_MESSAGE)


def service_stalled(service: str, timeout_s: float) -> RequestError:
    """The 503 of a backend that did not answer within --rpc-timeout-s (stopped, hung)."""
    return RequestError(
        503, f"the {service} did not answer within {timeout_s:g}s (--rpc-timeout-s)"
    )


class EngineError(Exception):
    """A sequence failed inside the engine (finish_reason ERROR); only that request fails."""


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


@dataclass(slots=True)
class ErrorInfo:
    """One mapped error: the HTTP status, the OpenAI body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def map_exception(exc: BaseException, retry_after_s: int = 1) -> ErrorInfo:
    """Map any exception a route can raise to an HTTP status and an OpenAI error body."""
    if isinstance(exc, RequestError):
        return _info(exc.status, exc.message, exc.param, exc.type, exc.code, exc.headers)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        message, param = _describe_validation(exc.errors())
        return _info(400, message, param)
    if isinstance(exc, grpc.aio.AioRpcError):
        return _from_grpc(exc, retry_after_s)
    if isinstance(exc, EngineError):
        return _info(500, f"the engine failed this request: {exc}")
    if isinstance(exc, StarletteHTTPException):
        message = str(exc.detail) if exc.detail else HTTPStatus(exc.status_code).phrase
        return _info(exc.status_code, message, headers=dict(exc.headers or {}))
    logger.error("unexpected error", exc_info=exc)
    return _info(500, "internal server error")


def _from_grpc(exc: grpc.aio.AioRpcError, retry_after_s: int) -> ErrorInfo:
    code = exc.code()
    status = _GRPC_STATUS.get(code, 500)
    details = exc.details() or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _info(
            503,
            f"the server is overloaded, retry later: {details}",
            headers={"Retry-After": str(retry_after_s)},
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _info(504, REQUEST_TIMEOUT_MESSAGE)
    if code == grpc.StatusCode.UNAVAILABLE:
        return _info(503, "a backend service is unavailable")
    if status < 500:
        return _info(status, details, param_from_details(details) if status == 400 else None)
    # NOTE: backend internals stay in the log, not in the response.
    logger.error("backend call failed: %s %s", code.name, details)
    return _info(status, f"backend error ({code.name})")


def _info(
    status: int,
    message: str,
    param: str | None = None,
    type_: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> ErrorInfo:
    if type_ is None:
        type_ = _TYPE_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
    body = {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": code if code is not None else status,
        }
    }
    return ErrorInfo(status, body, headers or {})


def error_response(exc: BaseException, retry_after_s: int = 1) -> Response:
    """The JSON response for `exc` (ASCII-escaped: a lone surrogate must not break it)."""
    info = map_exception(exc, retry_after_s)
    return Response(
        json.dumps(info.body),
        status_code=info.status,
        media_type="application/json",
        headers=info.headers,
    )


def sse_error_event(exc: BaseException, retry_after_s: int = 1) -> str:
    """An error met mid-stream, as one SSE event (the caller sends `[DONE]` after it)."""
    return f"data: {json.dumps(map_exception(exc, retry_after_s).body)}\n\n"


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type", "missing"):
        return (
            "the request body must be a JSON object sent with Content-Type: application/json"
        ), None
    if "param" in ctx:
        return err.get("msg", "invalid value"), str(ctx["param"])
    param = str(loc[0]) if loc else None
    where = ".".join(str(p) for p in loc)
    msg = err.get("msg", "invalid value")
    if kind == "missing":
        return f"'{where}' is a required property", param
    # NOTE: the offending input is not echoed: it may be huge or hold unsafe characters.
    return (f"{msg}: '{where}'" if where else msg), param


_KNOWN_PARAMS = frozenset(
    {
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "logit_bias",
        "stop",
        "stop_token_ids",
        "logprobs",
        "prompt_logprobs",
        "n",
        "seed",
        "repetition_penalty",
        "min_tokens",
        "chat_template",
        "chat_template_kwargs",
        "tools",
        "add_generation_prompt",
        "continue_final_message",
    }
)
_LEADING_NAME = re.compile(r"[A-Za-z_]+")


def param_from_details(details: str) -> str | None:
    """Best effort: a backend INVALID_ARGUMENT that starts with a field name names it
    ("messages[0].role must be ...", "max_tokens: ...")."""
    m = _LEADING_NAME.match(details)
    return m.group(0) if m and m.group(0) in _KNOWN_PARAMS else None
