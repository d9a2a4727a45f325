"""What completions and chat completions share: model check, limits, running the sequences
(non-streaming, or streaming as SSE) and recording metrics."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from splitserve.common.lora import TOKENIZER_FILES
from splitserve.gateway.clients import ServiceClients
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.errors import RequestError, sse_error_event
from splitserve.gateway.generation import Deadline, SequenceDelta, SequenceGroup, SequenceSpec
from splitserve.gateway.lora_registry import LoRARegistry
from splitserve.gateway.metrics import GatewayMetrics
from splitserve.gateway.request_observer import RequestObserver, current_observer
from splitserve.gateway.sampling import Limits
from splitserve.gateway.streaming import DONE, ChunkWriter, SSEResponse, run_until_disconnect

logger = logging.getLogger(__name__)

RenderDelta = Callable[[int, SequenceDelta], Sequence[str]]


class ServingBase:
    """Request plumbing shared by the OpenAI generation endpoints."""

    def __init__(
        self,
        config: GatewayConfig,
        clients: ServiceClients,
        metrics: GatewayMetrics,
        loras: LoRARegistry | None = None,
    ) -> None:
        self.config = config
        self.clients = clients
        self.metrics = metrics
        self.loras = loras if loras is not None else LoRARegistry(config)

    @property
    def served_names(self) -> list[str]:
        reported = self.clients.model_info.model if self.clients.model_info else ""
        return self.config.model_names(reported)

    async def check_model(self, name: str | None) -> str:
        """The name to report (an adapter's own name for a LoRA adapter); unknown names are a
        404 (`model_not_found`). A name that is not a base name is looked up among the
        scheduler's adapters (a call only when this gateway has not seen it)."""
        names = self.served_names
        if name and name not in names and await self.loras.lookup(name) is not None:
            return name
        if name and name not in names:
            raise RequestError(
                404,
                f"The model `{name}` does not exist.",
                param="model",
                type="invalid_request_error",
                code="model_not_found",
            )
        return names[0]

    def attach_lora(self, specs: list[SequenceSpec], model: str | None) -> None:
        """Point every sequence at the adapter `model` names, if it names one."""
        # NOTE: the name alone: the scheduler resolves it to the folder and load number it
        # holds now (another gateway may have reloaded it), or refuses it with NOT_FOUND.
        adapter = self.loras.get(model)
        if adapter is None:
            return
        tokenizer = self.adapter_tokenizer(model)
        for spec in specs:
            spec.lora_name = adapter.name
            spec.tokenizer_lora_path = tokenizer

    def adapter_tokenizer(self, model: str | None) -> str:
        """The folder of the adapter `model` names when it ships its own tokenizer (tokens it
        adds), for the tokenizer service to tokenize and decode with; else ""."""
        adapter = self.loras.get(model)
        if adapter is None or not any((adapter.path / f).is_file() for f in TOKENIZER_FILES):
            return ""
        return str(adapter.path)

    def limits(self, model: str | None = None) -> Limits:
        """The request limits; a request whose `model` names an adapter may use token ids up
        to --lora-extra-vocab-size past the vocabulary (the worker checks what that adapter
        adds)."""
        info = self.clients.model_info
        vocab = self.clients.vocab_size
        if model and self.loras.get(model) is not None:
            vocab += self.config.lora_extra_vocab_size
        return Limits.from_config(
            self.config,
            vocab,
            self.clients.max_model_len,
            info.max_logprobs if info is not None else 0,
            self.clients.sampling_defaults,
        )

    def deadline(self) -> Deadline:
        return Deadline(self.config.request_timeout_s)

    def tokens_as_ids(self, req) -> bool:
        """Logprob tokens as "token_id:N": the request's return_tokens_as_token_ids, else
        --return-tokens-as-token-ids."""
        if req.return_tokens_as_token_ids is not None:
            return req.return_tokens_as_token_ids
        return self.config.return_tokens_as_token_ids

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ running

    async def collect(
        self, raw: Request, specs: list[SequenceSpec], deadline: Deadline, arrival: float
    ) -> list[list[SequenceDelta]]:
        """Run every sequence to the end; a disconnect cancels them all."""
        observer = self._observer(specs)
        group = SequenceGroup(self.clients, specs, deadline)

        async def drain() -> list[list[SequenceDelta]]:
            out: list[list[SequenceDelta]] = [[] for _ in specs]
            while (event := await group.next()) is not None:
                observer.on_delta(*event)
                out[event[0]].append(event[1])
            return out

        try:
            return await run_until_disconnect(raw, drain())
        finally:
            await group.aclose()

    async def stream(
        self,
        raw: Request,
        specs: list[SequenceSpec],
        deadline: Deadline,
        arrival: float,
        render: RenderDelta,
        finish: Callable[[], Iterable[str]],
    ) -> Response:
        """Start the sequences and wait for the first output, so that errors met before any
        token (queue full, bad argument, deadline) still get their HTTP status; then stream."""
        observer = self._observer(specs)
        group = SequenceGroup(self.clients, specs, deadline)
        try:
            first = await run_until_disconnect(raw, group.next())
        except BaseException:
            await group.aclose()
            raise
        if first is not None:
            observer.on_delta(*first)
        writer = ChunkWriter()
        body = self._sse_body(group, first, render, finish, observer, writer)
        return SSEResponse(body, group.aclose, writer)

    def _observer(self, specs: list[SequenceSpec]) -> RequestObserver:
        observer = current_observer()
        if observer is None:  # not opened by a route (direct use): metrics only
            observer = RequestObserver(self.metrics, self.served_names[0], "")
        observer.start(specs)
        return observer

    async def _sse_body(
        self,
        group: SequenceGroup,
        first: tuple[int, SequenceDelta] | None,
        render: RenderDelta,
        finish: Callable[[], Iterable[str]],
        observer: RequestObserver,
        writer: ChunkWriter,
    ) -> AsyncIterator[str]:
        on_delta, poll, next_event = observer.on_delta, group.poll, group.next

        def push(item: tuple) -> tuple | None:
            """A delta that arrives while this task waits, rendered in the task that
            produced it (the output router's reader) and written at the loop's next turn
            with the rest of its batch: no wake-up of this task per token. A sequence's last
            delta, errors, and anything while the writer is not ready are handed back to the
            loop below."""
            index, delta, exc = item
            if exc is not None or delta.finish_reason is not None or not writer.ready:
                return item
            try:
                on_delta(index, delta)
                parts = render(index, delta)
            except Exception as exc:  # the loop below raises it: the SSE error event
                return (index, None, exc)
            if parts:  # the same bytes the loop below would yield for it
                writer.push(parts[0] if len(parts) == 1 else "".join(parts))
            return None

        try:
            event = first
            while event is not None:
                # NOTE: the deltas already waiting go out in one write (same SSE events).
                parts = render(*event)
                failed: Exception | None = None
                try:
                    ready = poll()
                    if ready is not None:
                        parts = list(parts)
                        while ready is not None:
                            on_delta(*ready)
                            parts.extend(render(*ready))
                            ready = poll()
                except Exception as exc:  # after what is rendered, as the SSE error event
                    failed = exc
                if parts:  # an empty write would send no byte
                    yield parts[0] if len(parts) == 1 else "".join(parts)
                if failed is not None:
                    raise failed
                event = await next_event(push)
                if event is not None:
                    on_delta(*event)
            for chunk in finish():
                yield chunk
        except Exception as exc:
            # NOTE: headers are sent; the error becomes an SSE event, then [DONE].
            logger.info("stream failed: %s", exc)
            observer.fail(exc)
            yield sse_error_event(exc, self.config.retry_after_s)
        finally:
            observer.fail("the client went away")  # no-op once finished
        yield DONE
