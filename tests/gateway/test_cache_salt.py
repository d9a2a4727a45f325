"""vLLM's cache_salt at the gateway: a non-empty string on completions and chat, checked with
a 400 naming the field, and carried to the scheduler on every sequence of the request."""

from __future__ import annotations

import uuid

import pytest

from .test_validation import assert_error

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


def body(path: str, text: str, **extra) -> dict:
    if path == CHAT:
        return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}
    return {"prompt": text, "max_tokens": 2, **extra}


@pytest.mark.parametrize("path", [COMPL, CHAT])
@pytest.mark.parametrize("salt", ["", 7, ["a"], {"a": 1}, True], ids=repr)
def test_bad_cache_salt_is_400_naming_it(http, fakes, path, salt):
    t = uuid.uuid4().hex[:8]
    r = http.post(path, json=body(path, f"salty {t}", cache_salt=salt))
    err = assert_error(r, 400, "cache_salt")
    assert "cache_salt" in err["message"]
    assert not fakes.scheduler.calls_matching(t)  # nothing reached the scheduler


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [COMPL, CHAT])
def test_cache_salt_reaches_the_scheduler_on_every_sequence(http, fakes, path, stream):
    t = uuid.uuid4().hex[:8]
    r = http.post(
        path, json=body(path, f"salty {t}", cache_salt="tenant-\u00e9 1", n=2, stream=stream)
    )
    assert r.status_code == 200, r.text
    calls = fakes.scheduler.calls_matching(t)
    assert len(calls) == 2
    assert [c.request.cache_salt for c in calls] == ["tenant-\u00e9 1"] * 2


@pytest.mark.parametrize("path", [COMPL, CHAT])
@pytest.mark.parametrize("extra", [{}, {"cache_salt": None}], ids=["absent", "null"])
def test_no_cache_salt_sends_none(http, fakes, path, extra):
    t = uuid.uuid4().hex[:8]
    r = http.post(path, json=body(path, f"plain {t}", **extra))
    assert r.status_code == 200, r.text
    (call,) = fakes.scheduler.calls_matching(t)
    assert call.request.cache_salt == ""
