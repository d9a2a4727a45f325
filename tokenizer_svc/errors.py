"""Per-request errors: raised by the tokenizer code, turned into gRPC statuses by the server.

Kept free of grpc so the tokenizer, chat and stop-string code runs and tests without it.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request the service refuses; the request fails and the service goes on.

    `status` names the gRPC status code (`grpc.StatusCode[status]`).
    """

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(RequestError):
    """Bad input: malformed messages, out-of-range token ids, a refused template."""

    status = "INVALID_ARGUMENT"


class NotReady(RequestError):
    """The tokenizer is still loading."""

    status = "UNAVAILABLE"
