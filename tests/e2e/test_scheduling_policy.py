"""The default --scheduling-policy fcfs through the whole stack: a priority is refused with a
400 (as vLLM), and the stack serves the next request; the scheduler logs its stats line."""

from __future__ import annotations

import openai
import pytest

from .conftest import wait_for


def test_priority_refused_under_fcfs(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(
            model=server.model, prompt="hello", max_tokens=2, extra_body={"priority": 1}
        )
    assert "--scheduling-policy priority" in str(exc.value)
    ok = client.completions.create(
        model=server.model, prompt="hello", max_tokens=2, extra_body={"priority": 0}
    )
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_scheduler_logs_stats_while_busy(client, server):
    client.completions.create(model=server.model, prompt="stats", max_tokens=8)

    def logged() -> bool:
        return any(
            "Avg prompt throughput:" in line and "KV cache usage:" in line
            for line in server.log.read_text().splitlines()
        )

    # The line is logged at info level on the interval after a busy one (1 s here).
    wait_for(logged, 30, "the scheduler's stats line", server.proc)
