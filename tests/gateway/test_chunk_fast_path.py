"""The per-token fast paths of streamed chunks (pre-rendered templates, no dict, no json.dumps)
send the same bytes as the general path, which builds each chunk as a dict and serializes it
with `sse()`: every request option that shapes a chunk, every kind of text, n > 1 interleaved,
first chunks, finishes and the final usage chunk, for completions and chat."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest

from splitserve.gateway.generation import SequenceDelta
from splitserve.gateway.metrics import GatewayMetrics
from splitserve.gateway.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.gateway.serving_chat import _ChatView
from splitserve.gateway.serving_completions import _CompletionView, _Prompt

TEXTS = [
    "hello",
    "",
    " world",
    'quo"te \\ back\\slash /',
    "\n\t\r\b\f",
    "\x00\x01\x1f\x7f",
    "héllo wörld",
    "🙂🚀 你好",
    "\u2028\u2029",
    "\ufffd",
    "</script>&<>'",
]


def _serving(prompt_details: bool) -> SimpleNamespace:
    config = SimpleNamespace(enable_prompt_tokens_details=prompt_details, response_role="assistant")
    return SimpleNamespace(
        clients=SimpleNamespace(token_string=lambda token_id, lora_path="": ("x", b"x")),
        config=config,
        metrics=GatewayMetrics("m"),
        tokens_as_ids=lambda req: False,
        adapter_tokenizer=lambda model: "",
    )


def _deltas(n: int, finish: str, stop_reason) -> list[tuple[int, SequenceDelta]]:
    """Every choice's deltas, interleaved: each text once (empty ones too), a token count
    that varies, prefix-cache hits that grow, then its finish."""
    out = []
    for k, text in enumerate(TEXTS):
        for i in range(n):
            ids = [7] * (1 + (k + i) % 3) if text or k % 2 else []
            out.append((i, SequenceDelta(text, ids, [], 5, None, None, None, k + i)))
    for i in range(n):
        out.append((i, SequenceDelta("end", [9], [], 5, None, finish, stop_reason, 99)))
    return out


OPTIONS = list(
    itertools.product(
        (False, True),  # stream_options.include_usage
        (False, True),  # continuous_usage_stats
        (False, True),  # return_token_ids
        (False, True),  # echo
        (1, 3),  # n
        (False, True),  # --enable-prompt-tokens-details
    )
)
FINISHES = [("length", None), ("stop", "###"), ("stop", 42), ("stop", None)]


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch):
    """Both views of a comparison must say the same `created`."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)


def _compare(fast, reference, deltas) -> None:
    """Render every delta with both views; the same chunks (as bytes) and the same counts
    after each, then the same final chunks."""
    for index, delta in deltas:
        got, want = fast.render_chunk(index, delta), reference.render_chunk(index, delta)
        assert [c.encode() for c in got] == [c.encode() for c in want]  # one event per chunk
        assert fast.num_tokens == reference.num_tokens
        assert fast.num_cached == reference.num_cached
        assert fast.started == reference.started
    assert fast.finish_reasons == reference.finish_reasons
    assert [c.encode() for c in fast.final_chunks()] == [
        c.encode() for c in reference.final_chunks()
    ]


@pytest.mark.parametrize("usage,continuous,token_ids,echo,n,details", OPTIONS)
def test_completion_chunks_match_the_general_path(usage, continuous, token_ids, echo, n, details):
    req = CompletionRequest(
        model="m",
        prompt=[1, 2, 3],
        stream=True,
        n=n,
        echo=echo,
        return_token_ids=token_ids,
        stream_options={"include_usage": usage, "continuous_usage_stats": continuous},
    )

    def view() -> _CompletionView:
        prompts = [_Prompt([1, 2, 3], 'the "prompt" é')]
        return _CompletionView(_serving(details), req, 'cmpl-ü"1', "m/ö", prompts, n, 0.0)

    assert (view().running_chunk is None) == (token_ids or (usage and continuous))
    for finish, stop_reason in FINISHES:
        fast, reference = view(), view()
        reference.plain_chunk = reference.running_chunk = None  # dicts through sse(), always
        _compare(fast, reference, _deltas(n, finish, stop_reason))


def test_completion_fast_path_is_off_with_logprobs():
    req = CompletionRequest(model="m", prompt=[1], stream=True, logprobs=2)
    view = _CompletionView(_serving(False), req, "cmpl-1", "m", [_Prompt([1], None)], 1, 0.0)
    assert view.running_chunk is None


@pytest.mark.parametrize("usage,continuous,token_ids,echo,n,details", OPTIONS)
def test_chat_chunks_match_the_general_path(usage, continuous, token_ids, echo, n, details):
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        n=n,
        return_token_ids=token_ids,
        stream_options={"include_usage": usage, "continuous_usage_stats": continuous},
    )

    def view() -> _ChatView:
        prefix = 'an "echo" ü\n' if echo else ""
        return _ChatView(_serving(details), req, 'chatcmpl-ü"1', "m/ö", [1, 2], n, 0.0, prefix)

    assert (view().content_chunk is None) == (token_ids or (usage and continuous))
    for finish, stop_reason in FINISHES:
        fast, reference = view(), view()
        reference.content_chunk = None  # dicts through sse(), always
        _compare(fast, reference, _deltas(n, finish, stop_reason))


def test_chat_fast_path_is_off_with_logprobs():
    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True
    )
    assert _ChatView(_serving(False), req, "c", "m", [1], 1, 0.0, "").content_chunk is None
