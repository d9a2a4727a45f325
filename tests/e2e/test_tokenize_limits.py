"""CHECKLIST row 30: a huge body on a route that reaches the tokenizer service gets the limits
of a prompt, a 400 before the service is called, and the service's memory comes back near its
baseline after the largest request it serves (glibc's freed arenas trimmed)."""

from __future__ import annotations

import time

import grpc
import httpx

from splitserve.protos import tokenizer_pb2, tokenizer_pb2_grpc

from .test_lifecycle import _cmdline

MAX_MODEL_LEN = 512  # conftest.Server's --max-model-len
LARGE_TEXT_CHARS = 2_000_000
"""What a long-context model's prompt limit lets through (gigabytes were kept after 16 MB)."""


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_tokenize_takes_a_prompts_limits_and_memory_comes_back(server):
    (tokenizer,) = [p for p in server.children if " tokenizer " in _cmdline(p)]
    with grpc.insecure_channel(server.tokenizer_address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        info = stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(), timeout=30)
        limit = MAX_MODEL_LEN * info.max_token_chars
        text = "the quick brown fox jumps over the lazy dog, héllo 你好 "
        with httpx.Client(base_url=server.url, timeout=120) as h:
            assert h.post("/tokenize", json={"prompt": text}).status_code == 200  # warm
            baseline = _rss_mb(tokenizer)
            largest = (text * (limit // len(text) + 1))[:limit]
            r = h.post("/tokenize", json={"prompt": largest})
            assert r.status_code == 200, r.text
            assert r.json()["count"] > 0
            # Past the limit, up to the 16 MB body limit: a quick 400, the service untouched.
            for size in (limit + 1, 15_000_000):
                started = time.monotonic()
                r = h.post("/tokenize", json={"prompt": "x" * size})
                assert r.status_code == 400, r.text[:300]
                assert r.json()["error"]["param"] == "prompt"
                assert "maximum context length of 512 tokens" in r.json()["error"]["message"]
                assert time.monotonic() - started < 10
            after_refusals = _rss_mb(tokenizer)
            assert after_refusals < baseline + 50, (baseline, after_refusals)
        # A caller the gateway does not guard, or a long-context model's largest prompt:
        # megabytes tokenized, and the memory they took is given back.
        big = (text * (LARGE_TEXT_CHARS // len(text) + 1))[:LARGE_TEXT_CHARS]
        ids = stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=big), timeout=300).token_ids
        assert len(ids) > LARGE_TEXT_CHARS // 4
        del ids
        after = _rss_mb(tokenizer)
    assert after < baseline + 100, f"the tokenizer service grew {baseline:.0f} -> {after:.0f} MB"
