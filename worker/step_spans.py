"""Per-step spans of a worker, with --collect-detailed-traces only.

The scheduler sends each request's W3C trace context once, with the request (NewRequest); the
worker keeps it until the request finishes and, after every step, emits one span per traced
request in that step, timed around the step's execution.
"""

from __future__ import annotations

from splitserve.common import tracing
from splitserve.protos import worker_pb2


class StepSpans:
    """Trace contexts of the requests this worker holds, and the spans of each step."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._contexts: dict[str, object] = {}
        self._tracer = tracing.get_tracer(__name__)

    def before(self, step: worker_pb2.StepRequest) -> None:
        for rid in step.finished_request_ids:
            self._contexts.pop(rid, None)
        for new in step.new_requests:
            if new.trace_context:
                self._contexts[new.request_id] = tracing.extract(new.trace_context)

    def after(self, step: worker_pb2.StepRequest, start_ns: int, end_ns: int) -> None:
        if not self._contexts:
            return
        batch = len(step.num_scheduled_tokens)
        total = sum(step.num_scheduled_tokens.values())
        for rid, num_tokens in step.num_scheduled_tokens.items():
            parent = self._contexts.get(rid)
            if parent is None:
                continue
            tracing.emit_span(
                self._tracer,
                "worker.execute_step",
                parent,
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
