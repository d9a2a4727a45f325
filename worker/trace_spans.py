"""A worker rank's spans in each request's trace.

The scheduler sends each request's W3C trace context once, with the request (NewRequest),
whenever tracing is on. By default this rank adds one `worker.request` span per request when
the request leaves it (finished, aborted or preempted: `finished_request_ids`), covering its
stay, with its prefill and decode step counts and tokens as attributes; a request resumed
after a preemption comes back as a new request and gets a span of its own, marked resumed.
The span is handed to the tracer's batch processor, which exports it off the step path.

With --collect-detailed-traces (costly, for debugging) the rank also emits a span per
traced request per step, timed around the step's execution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from splitserve.common import messages as msg
from splitserve.common import tracing


@dataclass(slots=True)
class _Stay:
    """What this rank saw of one request since it arrived."""

    context: object
    start_ns: int
    num_prompt_tokens: int
    num_computed_tokens: int
    resumed: bool
    prefill_steps: int = 0
    decode_steps: int = 0
    num_tokens: int = 0


class WorkerSpans:
    """Trace contexts of the requests this rank holds, their counters, and their spans."""

    def __init__(self, rank: int, per_step: bool = False) -> None:
        self.rank = rank
        self.per_step = per_step
        self._stays: dict[str, _Stay] = {}
        self._tracer = tracing.get_tracer(__name__)

    def before(self, step: msg.StepRequest) -> None:
        """Close the stays of requests that leave before `step`; open the new ones'."""
        if step.finished_request_ids and self._stays:
            now = time.time_ns()
            for rid in step.finished_request_ids:
                stay = self._stays.pop(rid, None)
                if stay is not None:
                    self._emit_stay(rid, stay, now)
        for new in step.new_requests:
            if new.trace_context:
                self._stays[new.request_id] = _Stay(
                    context=tracing.extract(new.trace_context),
                    start_ns=time.time_ns(),
                    num_prompt_tokens=new.num_prompt_tokens,
                    num_computed_tokens=new.num_computed_tokens,
                    resumed=len(new.token_ids) > new.num_prompt_tokens,
                )

    def after(self, step: msg.StepRequest, start_ns: int, end_ns: int) -> None:
        """Count `step` into the stays of the traced requests it ran (and, per_step, emit
        their step spans)."""
        if not self._stays:
            return
        batch = len(step.num_scheduled_tokens)
        total = sum(step.num_scheduled_tokens.values()) if self.per_step else 0
        for rid, num_tokens in step.num_scheduled_tokens.items():
            stay = self._stays.get(rid)
            if stay is None:
                continue
            if stay.num_computed_tokens < stay.num_prompt_tokens:
                stay.prefill_steps += 1
            else:
                stay.decode_steps += 1
            stay.num_computed_tokens += num_tokens
            stay.num_tokens += num_tokens
            if self.per_step:
                tracing.emit_span(
                    self._tracer,
                    "worker.execute_step",
                    stay.context,
                    start_ns,
                    end_ns,
                    {
                        "gen_ai.request.id": rid,
                        "splitserve.step_id": step.step_id,
                        "splitserve.rank": self.rank,
                        "splitserve.step.num_requests": batch,
                        "splitserve.step.num_tokens": total,
                        "splitserve.request.num_scheduled_tokens": num_tokens,
                    },
                )

    def _emit_stay(self, rid: str, stay: _Stay, end_ns: int) -> None:
        tracing.emit_span(
            self._tracer,
            "worker.request",
            stay.context,
            stay.start_ns,
            end_ns,
            {
                "gen_ai.request.id": rid,
                "splitserve.rank": self.rank,
                "splitserve.request.prefill_steps": stay.prefill_steps,
                "splitserve.request.decode_steps": stay.decode_steps,
                "splitserve.request.num_scheduled_tokens": stay.num_tokens,
                "splitserve.request.resumed_after_preemption": stay.resumed,
            },
        )
