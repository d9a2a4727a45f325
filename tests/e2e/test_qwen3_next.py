"""A Qwen3-Next checkpoint (gated delta net + gated attention, MoE with a shared expert)
through the real stack (gateway, tokenizer, scheduler and worker processes): concurrent prompts
of 75-300 tokens, prefill chunks of at most 48 tokens, few state slots and a block budget that
forces preemption; greedy tokens equal to transformers, logprobs within the parity rule; the
same prompt again starts from the mixers' state snapshot and the attention blocks of its cached
prefix; afterwards every block is free again."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from splitserve.testing.qwen3_next_model import build_qwen3_next

from ..models.utils import check_logprobs_close, hf_greedy_logprobs, hf_model
from .conftest import Server, wait_for

STEPS = 10
# NOTE: preemption must not depend on the order the four requests reach the scheduler: with
# these lengths every order, and arrivals up to 8 steps apart, preempts (checked by driving the
# scheduler over the fake worker); with 40/300/150/75, the order 150, 40, 75, 300 did not.
LENGTHS = [180, 300, 200, 75]


def _prompts():
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def qwen3_next(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gdn") / "tiny-qwen3-next"
    return build_qwen3_next(out, tokenizer_dir=tiny_model, mlp_only_layers=(2,))


@pytest.fixture(scope="module")
def gdn_server(qwen3_next, tmp_path_factory):
    # About 11 KiB of state per request (two mixers): 70000 bytes give the states at most
    # half, a few slots. 22 blocks of 16 tokens cannot hold two long requests at once.
    flags = [
        "--kv-cache-memory",
        "70000",
        "--num-gpu-blocks-override",
        "22",
        "--max-num-batched-tokens",
        "48",
        "--return-tokens-as-token-ids",
        "--enable-prompt-tokens-details",
    ]
    s = Server(qwen3_next, flags, tmp_path_factory.mktemp("logs") / "gdn.log")
    yield s
    s.stop()


def _complete(server: Server, prompt: list[int]) -> dict:
    r = httpx.post(
        server.url + "/v1/completions",
        json={
            "model": server.model,
            "prompt": prompt,
            "max_tokens": STEPS,
            "temperature": 0,
            "logprobs": 5,
            "ignore_eos": True,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _tokens_logprobs(choice: dict):
    lp = choice["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    tops = [
        {int(k.removeprefix("token_id:")): v for k, v in top.items()} for top in lp["top_logprobs"]
    ]
    return tokens, tops


def test_concurrent_chunked_preempted_requests_match_transformers(gdn_server, qwen3_next):
    ref = hf_greedy_logprobs(hf_model(qwen3_next), PROMPTS, STEPS, 5)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        bodies = list(pool.map(lambda p: _complete(gdn_server, p), PROMPTS))
    got = [_tokens_logprobs(b["choices"][0]) for b in bodies]
    assert [t for t, _ in got] == [t for t, _ in ref]
    check_logprobs_close(ref, got, "transformers", "splitserve")

    # Alone, the prompt's state is snapshotted at block boundaries its chunks end on; the
    # next time it starts from the last snapshot it has, with the blocks up to there.
    for expect_hit in (False, True):
        again = _complete(gdn_server, PROMPTS[1])
        assert _tokens_logprobs(again["choices"][0])[0] == ref[1][0]
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached % 16 == 0 and cached <= 288 and (cached > 0 or not expect_hit), cached

    stats = gdn_server.scheduler_stats()
    assert stats.num_preemptions > 0
    assert stats.enable_prefix_caching

    def idle():
        s = gdn_server.scheduler_stats()
        return s.num_running == 0 and s.num_free_blocks == s.num_total_blocks

    wait_for(idle, 30, "every block to be free")
