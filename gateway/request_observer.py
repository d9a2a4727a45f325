"""One HTTP generation request as metrics and a trace span see it.

The route opens a `RequestObserver`; it becomes the current one for the request's task (and
the tasks and stream it starts), and, with tracing on, its `llm_request` span becomes the
current span, so the gRPC calls to the tokenizer and the scheduler are its children. The
serving code reports each sequence's output as it arrives (time to first token, inter-token
latency, queue time) and the final counts; the span ends with the request, carrying vLLM's
attribute names (gen_ai.*).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence

from splitserve.common import tracing
from splitserve.gateway.generation import SequenceDelta, SequenceSpec
from splitserve.gateway.metrics import GatewayMetrics

_current: contextvars.ContextVar[RequestObserver | None] = contextvars.ContextVar(
    "splitserve_request_observer", default=None
)


def current_observer() -> RequestObserver | None:
    """The observer of the request this task serves, if any."""
    return _current.get()


class RequestObserver:
    """Per-request timings for the histograms, and the request's span."""

    def __init__(self, metrics: GatewayMetrics, model: str, endpoint: str) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self._start_ns = time.time_ns()
        self.model = model
        self.ttft_s: float | None = None
        self.queue_time_s: float | None = None
        self._specs: Sequence[SequenceSpec] = ()
        self._num_tokens: list[int] = []
        """Tokens each sequence produced so far."""
        self._last_token_at: dict[int, float] = {}
        self._first_at: dict[int, float] = {}
        """When each sequence's first output arrived."""
        self._finished_at: dict[int, float] = {}
        """When each sequence's last output (the one with its finish reason) arrived."""
        self._span = None
        if tracing.enabled():
            from opentelemetry import context, trace

            self._span = tracing.get_tracer(__name__).start_span(
                "llm_request",
                kind=trace.SpanKind.SERVER,
                start_time=self._start_ns,
                attributes={
                    "gen_ai.system": "splitserve",
                    "gen_ai.request.model": model,
                    "gen_ai.response.model": model,
                    "http.route": endpoint,
                },
            )
            # NOTE: attached for the rest of this request's task (uvicorn runs one task per
            # request), so the streaming body and the sequence tasks inherit it.
            context.attach(trace.set_span_in_context(self._span))
        _current.set(self)

    # ------------------------------------------------------------------ progress

    def start(self, specs: Sequence[SequenceSpec]) -> None:
        """The sequences are about to run (after tokenization and validation)."""
        self._specs = specs
        self._num_tokens = [0] * len(specs)
        span = self._span
        if span is None or not specs:
            return
        sp = specs[0].sampling
        # Sequence ids are `<request id>-<prompt index>-<i>` (gateway/sampling.py).
        request_id = specs[0].request_id.rsplit("-", 2)[0]
        attrs = {
            "gen_ai.request.id": request_id,
            "gen_ai.request.n": len(specs),
            "gen_ai.request.temperature": sp.temperature,
            "gen_ai.request.top_p": sp.top_p,
            "gen_ai.request.top_k": sp.top_k,
        }
        if sp.HasField("max_tokens"):
            attrs["gen_ai.request.max_tokens"] = sp.max_tokens
        if sp.HasField("seed"):
            attrs["gen_ai.request.seed"] = sp.seed
        span.set_attributes(attrs)

    def on_delta(self, index: int, delta: SequenceDelta) -> None:
        now = time.monotonic()
        last = self._last_token_at.get(index)
        if last is not None:
            # NOTE: the per-token path: the sequence's first output and queue time are in.
            if delta.finish_reason is not None:
                self._finished_at[index] = now
            n = len(delta.token_ids)
            if n:
                if index < len(self._num_tokens):
                    self._num_tokens[index] += n
                self.metrics.inter_token_latency.observe(now - last)
                self._last_token_at[index] = now
            return
        if index not in self._first_at:
            # vLLM observes time to first token per child request: per sequence here.
            self._first_at[index] = now
            self.metrics.ttft.observe(now - self.arrival)
            if self.ttft_s is None:
                self.ttft_s = now - self.arrival
        if delta.finish_reason is not None:
            self._finished_at[index] = now
        if index < len(self._specs):
            queue_time = self._specs[index].queue_time_s
            if queue_time is not None and index not in self._last_token_at:
                self.metrics.queue_time.observe(queue_time)
                if self.queue_time_s is None:
                    self.queue_time_s = queue_time
        if not delta.token_ids:
            return
        if index < len(self._num_tokens):
            self._num_tokens[index] += len(delta.token_ids)
        self._last_token_at[index] = now

    # ------------------------------------------------------------------ the end

    def finish(self, prompt_tokens: int, completion_tokens: int, reasons: list[str]) -> None:
        """The request completed (its totals recorded by the caller): record its sequences'
        figures and end the span."""
        self._record_sequences()
        span, self._span = self._span, None
        if span is None:
            return
        e2e = time.monotonic() - self.arrival
        attrs = {
            "gen_ai.usage.prompt_tokens": prompt_tokens,
            "gen_ai.usage.completion_tokens": completion_tokens,
            "gen_ai.usage.num_sequences": len(reasons),
            "gen_ai.response.finish_reasons": list(reasons),
            "gen_ai.latency.e2e": e2e,
        }
        if self.ttft_s is not None:
            attrs["gen_ai.latency.time_to_first_token"] = self.ttft_s
        if self.queue_time_s is not None:
            attrs["gen_ai.latency.time_in_queue"] = self.queue_time_s
        span.set_attributes(attrs)
        # The span lasts exactly the e2e latency it reports.
        span.end(end_time=self._start_ns + int(e2e * 1e9))

    @property
    def num_sequences(self) -> int:
        """Sequences started and not yet recorded."""
        return len(self._specs)

    def _record_sequences(self) -> None:
        """vLLM's per-request histograms. Each sequence is one of vLLM's requests (tokens,
        max_tokens, phase times, e2e latency); each prompt's group of n sequences is one parent
        request (n, and the most tokens a sequence of the group produced)."""
        m = self.metrics
        now = time.monotonic()
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(self._specs):
            num_tokens = self._num_tokens[i]
            m.e2e_latency.observe(self._finished_at.get(i, now) - self.arrival)
            m.request_prompt_tokens.observe(len(spec.prompt_token_ids))
            m.request_generation_tokens.observe(num_tokens)
            if spec.sampling.HasField("max_tokens"):
                m.params_max_tokens.observe(spec.sampling.max_tokens)
            if spec.prefill_time_s is not None:
                m.prefill_time.observe(spec.prefill_time_s)
                m.decode_time.observe(spec.decode_time_s)
                m.inference_time.observe(spec.prefill_time_s + spec.decode_time_s)
                # vLLM: the mean gap after the first token; 0 with a single token.
                gaps = num_tokens - 1
                m.request_tpot.observe(spec.decode_time_s / gaps if gaps > 0 else 0.0)
            # Sequence ids are `<request id>-<prompt index>-<i>` (gateway/sampling.py).
            groups.setdefault(spec.request_id.rsplit("-", 1)[0], []).append(num_tokens)
        for counts in groups.values():
            m.params_n.observe(len(counts))
            m.max_num_generation_tokens.observe(max(counts))
        self._specs = ()  # recorded once

    def fail(self, error: BaseException | str) -> None:
        """The request failed or was abandoned; end the span with an error status."""
        span, self._span = self._span, None
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if isinstance(error, BaseException):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
        span.set_attribute("gen_ai.latency.e2e", time.monotonic() - self.arrival)
        span.end()
