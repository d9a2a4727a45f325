"""--enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens reports the prompt
tokens the scheduler found in its prefix cache (vLLM's flag); off by default."""

from __future__ import annotations

import pytest

from .test_completions import sse_events, tag

COMPL = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture
def detailed(make_gateway):
    return make_gateway(enable_prompt_tokens_details=True)


def test_off_by_default(http):
    r = http.post(
        COMPL, json={"model": "fake-model", "prompt": f"{tag()} #cached@5", "max_tokens": 2}
    )
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"] is None  # as vLLM: null when off


def test_completions_report_cached_tokens(detailed):
    with detailed.client() as c:
        # n=2: the sequences report 5 and 8 (the second also hit the first one's blocks);
        # what was cached before the request is the least of them.
        body = {"model": "fake-model", "prompt": f"{tag()} #cached@5", "max_tokens": 2, "n": 2}
        usage = c.post(COMPL, json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 5}
        # Two prompts: summed per prompt.
        body = {"model": "fake-model", "prompt": [f"{tag()} #cached@2", f"{tag()} #cached@4"]}
        usage = c.post(COMPL, json={**body, "max_tokens": 2}).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 6}
        # Streamed, with the final usage chunk.
        body = {
            "model": "fake-model",
            "prompt": f"{tag()} #cached@7",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = sse_events(c.post(COMPL, json=body).text)
        assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 7}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_reports_cached_tokens(detailed, stream):
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": f"{tag()} #cached@9"}],
        "max_tokens": 3,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    with detailed.client() as c:
        r = c.post(CHAT, json=body)
    usage = sse_events(r.text)[-1]["usage"] if stream else r.json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 9}
    assert usage["prompt_tokens"] > 0
