"""Async gRPC clients of the scheduler and tokenizer services, and the facts cached from them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.common.generation_config import SamplingDefaults
from splitserve.gateway.errors import service_stalled
from splitserve.protos import (
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Prompt logprobs of a long prompt exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]
SCHEDULER_CHANNEL_OPTIONS = [
    *_CHANNEL_OPTIONS,
    # NOTE: backpressure on the output stream. With gRPC's defaults (64 KiB per stream, grown
    # by BDP probing) a gateway that falls behind the engine lets megabytes of OutputBatch
    # messages pile up in its own receive buffers, and then handles them one step at a time:
    # one write per token per stream. With a small fixed window the scheduler's write waits
    # instead, its OutputStream collects the next steps' outputs into one message, and each
    # stream gets its waiting tokens in one write (serving_base._sse_body). On the saturated
    # 2-core stack benchmark this cut the gateway's CPU per token by about a quarter
    # (bench/RESULTS.md, "Stack overhead"). A message larger than the window still flows: gRPC
    # opens the window for a message the gateway is reading.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16 * 1024),
]
SCHEDULER = "scheduler"
HEARTBEATS_PER_TIMEOUT = 4
"""Heartbeats a scheduler stream sends per --rpc-timeout-s of silence: a few may be late or
lost to a busy loop before the stream counts as stalled."""
TOKENIZER_SERVICE = "tokenizer service"
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
)


class ServiceClients:
    """One channel per service, created once; model and tokenizer facts fetched at start-up."""

    def __init__(
        self, scheduler_address: str, tokenizer_address: str, rpc_timeout_s: float = 60.0
    ) -> None:
        self.scheduler_address = scheduler_address
        self.tokenizer_address = tokenizer_address
        self.rpc_timeout_s = rpc_timeout_s
        """Deadline of each unary call, within the request's own (--rpc-timeout-s); also how
        long the output stream may stay silent before the scheduler counts as stalled."""
        self._scheduler_channel: grpc.aio.Channel | None = None
        self._tokenizer_channel: grpc.aio.Channel | None = None
        self.scheduler: scheduler_pb2_grpc.SchedulerServiceStub | None = None
        self.tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub | None = None
        self.model_info: scheduler_pb2.ModelInfo | None = None
        self.tokenizer_info: tokenizer_pb2.TokenizerInfo | None = None
        self.sampling_defaults = SamplingDefaults()
        """Defaults for request fields left unset (the model's generation config)."""
        self._token_strings: dict[int, tuple[str, bytes]] = {}
        self._adapter_token_strings: dict[str, dict[int, tuple[str, bytes]]] = {}
        """Adapter folder (with its own tokenizer) -> its token strings."""
        self.router = None
        """The batched output stream (an OutputRouter), once the services support it; None:
        each sequence runs its own Generate and DetokenizeStream calls."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout_s: float = 600.0) -> None:
        """Open the channels and wait (retrying) until both services answer. Idempotent."""
        if self._scheduler_channel is None:
            self._scheduler_channel = grpc.aio.insecure_channel(
                self.scheduler_address, options=SCHEDULER_CHANNEL_OPTIONS
            )
            # The tokenizer service is stateless between calls: with several replicas behind
            # one DNS name (docker compose --scale tokenizer=N) calls spread over all of them.
            self._tokenizer_channel = grpc.aio.insecure_channel(
                self.tokenizer_address,
                options=[*_CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")],
            )
            self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._scheduler_channel)
            self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self._tokenizer_channel)
        deadline = time.monotonic() + timeout_s
        if self.model_info is None:
            info = await _call_with_retries(
                lambda t: self.scheduler.GetModelInfo(
                    scheduler_pb2.GetModelInfoRequest(), timeout=t, wait_for_ready=True
                ),
                deadline,
                f"the scheduler at {self.scheduler_address} (ready once its workers have loaded "
                "the model)",
            )
            # NOTE: checked here, so that a bad default fails start-up instead of turning
            # into a 400 that blames a client who never sent the field.
            self.sampling_defaults = SamplingDefaults.from_proto(info.sampling_defaults)
            self.sampling_defaults.warn_if_changed()
            self.model_info = info
        if self.tokenizer_info is None:
            self.tokenizer_info = await _call_with_retries(
                lambda t: self.tokenizer.GetTokenizerInfo(
                    tokenizer_pb2.GetTokenizerInfoRequest(), timeout=t, wait_for_ready=True
                ),
                deadline,
                f"the tokenizer service at {self.tokenizer_address}",
            )
        if self.router is None:
            self.router = await self._make_router(deadline)
        logger.info(
            "services ready: max_model_len=%d vocab_size=%d tokenizer=%s",
            self.model_info.max_model_len,
            self.model_info.vocab_size,
            self.tokenizer_info.name,
        )

    async def _make_router(self, deadline: float):
        """The batched output path, when the tokenizer ships its decoder; else None."""
        from splitserve.gateway.output_stream import DecoderInfo, OutputRouter

        try:
            spec = await _call_with_retries(
                lambda t: self.tokenizer.GetDecoder(
                    tokenizer_pb2.GetDecoderRequest(), timeout=t, wait_for_ready=True
                ),
                deadline,
                "tokenizer GetDecoder",
                retry_unimplemented=False,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            spec = None
        if spec is None or not spec.tokenizer_json:
            logger.info("the tokenizer is not shipped to the gateway: detokenizing per sequence")
            return None
        return OutputRouter(self, DecoderInfo(spec))

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()
            self.router = None
        for channel in (self._scheduler_channel, self._tokenizer_channel):
            if channel is not None:
                await channel.close()
        self._scheduler_channel = self._tokenizer_channel = None

    async def health(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Serving state of each service through the standard gRPC health service."""
        names = ("scheduler", "tokenizer")
        channels = (self._scheduler_channel, self._tokenizer_channel)
        results = await asyncio.gather(*(_is_serving(c, timeout_s) for c in channels))
        serving = dict(zip(names, results, strict=True))
        if self.router is not None and self.router.stalled:
            # NOTE: its health service may still answer while its outputs stopped.
            serving["scheduler"] = False
        return serving

    # ------------------------------------------------------------------ bounded calls

    @property
    def heartbeat_interval_s(self) -> float:
        """How often the scheduler's streams to this gateway send a heartbeat when quiet."""
        return self.rpc_timeout_s / HEARTBEATS_PER_TIMEOUT

    async def read_stream(self, call, service: str):
        """The next message of a streaming `call` (EOF at its end); a silence past
        --rpc-timeout-s fails it as a stalled `service` (503). A scheduler stream must ask for
        heartbeats, or a request that is only queued or slow would count as stalled."""
        # NOTE: asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation
        # that lands as the read completes, and a disconnected client's sequence would go on.
        try:
            async with asyncio.timeout(self.rpc_timeout_s):
                return await call.read()
        except TimeoutError:
            call.cancel()
            raise service_stalled(service, self.rpc_timeout_s) from None

    def call_timeout(self, deadline=None) -> float:
        """A unary call's timeout: the request's time left, at most --rpc-timeout-s."""
        remaining = deadline.remaining() if deadline is not None else None
        return self.rpc_timeout_s if remaining is None else min(remaining, self.rpc_timeout_s)

    def stalled_error(self, exc: grpc.aio.AioRpcError, deadline, service: str):
        """`exc` as the 503 of a stalled service when it is --rpc-timeout-s running out (not
        the request's own deadline, which stays a 504); else `exc` itself."""
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not (
            deadline is not None and deadline.expired()
        ):
            return service_stalled(service, self.rpc_timeout_s)
        return exc

    async def unary(self, service: str, method, request, deadline=None):
        """`method(request)` bounded by call_timeout; a stalled service becomes a 503."""
        try:
            return await method(request, timeout=self.call_timeout(deadline))
        except grpc.aio.AioRpcError as exc:
            error = self.stalled_error(exc, deadline, service)
            if error is exc:
                raise
            raise error from None

    # ------------------------------------------------------------------ cached facts

    @property
    def vocab_size(self) -> int:
        """Valid token ids are [0, vocab_size): the embedding rows, else the tokenizer's size."""
        if self.model_info is not None and self.model_info.vocab_size > 0:
            return self.model_info.vocab_size
        return self.tokenizer_info.vocab_size if self.tokenizer_info is not None else 0

    @property
    def max_model_len(self) -> int:
        return self.model_info.max_model_len if self.model_info is not None else 0

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_info.eos_token_ids) if self.model_info is not None else set()
        if self.tokenizer_info is not None and self.tokenizer_info.eos_token_id >= 0:
            ids.add(self.tokenizer_info.eos_token_id)
        return frozenset(ids)

    # ------------------------------------------------------------------ token strings

    def _strings(self, lora_path: str) -> dict[int, tuple[str, bytes]]:
        """The token-string cache of the model's tokenizer, or of an adapter folder's own
        (its added tokens); each is bounded by its vocabulary."""
        if not lora_path:
            return self._token_strings
        return self._adapter_token_strings.setdefault(lora_path, {})

    def missing_token_strings(self, ids: Iterable[int], lora_path: str = "") -> list[int]:
        """Ids whose decoded string is not cached yet (deduplicated, order kept)."""
        cache = self._strings(lora_path)
        return list(dict.fromkeys(i for i in ids if i not in cache))

    async def fetch_token_strings(self, ids: list[int], deadline=None, lora_path: str = "") -> None:
        """Decode each id alone (DecodeEach) and cache it; the vocabulary bounds the cache."""
        if not ids:
            return
        resp = await self.unary(
            TOKENIZER_SERVICE,
            self.tokenizer.DecodeEach,
            tokenizer_pb2.DecodeEachRequest(token_ids=ids, lora_path=lora_path),
            deadline,
        )
        cache = self._strings(lora_path)
        token_bytes = list(resp.token_bytes)
        for k, token_id in enumerate(ids):
            text = resp.tokens[k] if k < len(resp.tokens) else ""
            raw = token_bytes[k] if k < len(token_bytes) else text.encode("utf-8", "replace")
            cache[token_id] = (text, raw)

    def token_string(self, token_id: int, lora_path: str = "") -> tuple[str, bytes]:
        """The cached (text, bytes) of one id; fetch_token_strings must have run for it."""
        return self._strings(lora_path).get(token_id, ("", b""))


async def _call_with_retries(call, deadline: float, what: str, retry_unimplemented=True):
    delay = 0.1
    waiting = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} did not answer before the start-up timeout")
        try:
            return await call(min(remaining, 10.0))
        except grpc.aio.AioRpcError as e:
            if e.code() not in _RETRYABLE or (
                e.code() == grpc.StatusCode.UNIMPLEMENTED and not retry_unimplemented
            ):
                raise
            if not waiting:  # one line, not one per retry
                logger.info("waiting for %s", what)
                waiting = True
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 2.0)


async def _is_serving(channel: grpc.aio.Channel | None, timeout_s: float) -> bool:
    if channel is None:
        return False
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
    except grpc.aio.AioRpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING
