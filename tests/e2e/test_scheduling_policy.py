"""The default --scheduling-policy fcfs through the whole stack: a priority is refused with a
400 (as vLLM), and the stack serves the next request."""

from __future__ import annotations

import openai
import pytest


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
