"""One server interceptor for every splitserve gRPC service.

Expected request errors become their own status (via `map_error`); any other exception
becomes INTERNAL with its traceback logged, so a bug answers cleanly instead of hanging the
call. Aborts and cancellations pass through untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable

import grpc

logger = logging.getLogger(__name__)

ErrorMapper = Callable[[Exception], "tuple[grpc.StatusCode, str] | None"]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, map_error: ErrorMapper | None = None) -> None:
        self.map_error = map_error

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(
                    self._guard(behavior, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _guard(self, behavior, method: str):
        async def fail(context, exc: Exception) -> None:
            mapped = self.map_error(exc) if self.map_error else None
            if mapped is not None:
                await context.abort(*mapped)
            logger.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                try:
                    async for item in behavior(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await fail(context, exc)

            return stream

        async def call(request, context):
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await fail(context, exc)

        return call
