"""The scheduler's spans of one request: queued, prefill and decode.

The step loop runs on its own thread, so nothing there holds a span open: the Generate call
notes when the request arrived, when it was first scheduled (from the engine), when its first
token came back and when it finished, and emits the three spans with those explicit times
under the call's own (propagated) trace context.
"""

from __future__ import annotations

import time

from splitserve.common import tracing

from .scheduler import RequestOutput


class RequestTimeline:
    """Timestamps (wall clock, ns) of one request as its Generate call sees them."""

    __slots__ = (
        "request_id",
        "parent",
        "arrival_ns",
        "first_scheduled_ns",
        "first_token_ns",
        "num_prompt_tokens",
        "num_cached_tokens",
        "num_output_tokens",
        "finish_reason",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.parent = None
        if tracing.enabled():  # the Generate call's server span
            from opentelemetry import context

            self.parent = context.get_current()
        self.arrival_ns = time.time_ns()
        self.first_scheduled_ns = 0
        self.first_token_ns = 0
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.finish_reason = 0

    def queue_time_s(self) -> float:
        return max(0, self.first_scheduled_ns - self.arrival_ns) / 1e9

    def observe(self, out: RequestOutput) -> None:
        if out.first_scheduled_ns and not self.first_scheduled_ns:
            self.first_scheduled_ns = out.first_scheduled_ns
        if out.token_ids and not self.first_token_ns:
            self.first_token_ns = time.time_ns()
        self.num_output_tokens += len(out.token_ids)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason

    def set_phase_times(self, resp) -> None:
        """On a request's last message (observed already): its prefill and decode times,
        vLLM's phases (first scheduled to first token, first token to last token), when it
        produced a token. The last token is the one this message carries: now."""
        if self.first_scheduled_ns and self.first_token_ns:
            resp.prefill_time_s = max(0, self.first_token_ns - self.first_scheduled_ns) / 1e9
            resp.decode_time_s = max(0, time.time_ns() - self.first_token_ns) / 1e9

    def emit(self) -> None:
        """The queued / prefill / decode spans, as far as the request got."""
        tracer = tracing.get_tracer(__name__)
        end = time.time_ns()
        attrs = {"gen_ai.request.id": self.request_id}
        scheduled = self.first_scheduled_ns or end
        tracing.emit_span(
            tracer, "scheduler.queued", self.parent, self.arrival_ns, scheduled, attrs
        )
        if not self.first_scheduled_ns:
            return
        first_token = self.first_token_ns or end
        tracing.emit_span(
            tracer,
            "scheduler.prefill",
            self.parent,
            scheduled,
            first_token,
            {
                **attrs,
                "gen_ai.usage.prompt_tokens": self.num_prompt_tokens,
                "splitserve.num_cached_tokens": self.num_cached_tokens,
            },
        )
        if not self.first_token_ns:
            return
        tracing.emit_span(
            tracer,
            "scheduler.decode",
            self.parent,
            first_token,
            end,
            {
                **attrs,
                "gen_ai.usage.completion_tokens": self.num_output_tokens,
                "splitserve.finish_reason": self.finish_reason,
            },
        )
