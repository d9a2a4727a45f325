"""Tokens per step (vllm:iteration_tokens_total) and the cache / LoRA facts in GetStats."""

from __future__ import annotations

import pytest

from splitserve.scheduler.step_tokens import STEP_TOKEN_BOUNDS, StepTokenHistogram

from .utils import gen_request, make_engine, run_to_completion


def test_histogram_buckets_are_le_and_cumulative():
    h = StepTokenHistogram((1, 8, 16))
    for n in (1, 2, 8, 9, 16, 17, 1000):
        h.observe(n)
    # le=1: {1}; le=8: +{2, 8}; le=16: +{9, 16}; +Inf: +{17, 1000}
    assert h.cumulative() == [1, 3, 5, 7]
    assert h.total == 1 + 2 + 8 + 9 + 16 + 17 + 1000


def test_histogram_refuses_unsorted_bounds():
    with pytest.raises(ValueError, match="strictly increasing"):
        StepTokenHistogram((8, 1))


def test_every_step_counts_its_scheduled_tokens():
    engine, _ = make_engine(num_blocks=64, enable_prefix_caching=False)
    sched = engine.scheduler
    sched.add_request(gen_request("a", list(range(1, 11)), 4))  # 10 prompt tokens
    sched.add_request(gen_request("b", list(range(20, 23)), 2))  # 3 prompt tokens
    run_to_completion(engine)
    s = sched.stats()
    assert list(s.iteration_tokens_bounds) == list(STEP_TOKEN_BOUNDS)
    counts = list(s.iteration_tokens_bucket_counts)
    assert len(counts) == len(STEP_TOKEN_BOUNDS) + 1
    assert counts == sorted(counts)  # cumulative
    # Both prompts in one step (13 tokens), then decodes: "a" needs 3 more inputs, "b" 1.
    assert s.iteration_tokens_sum == 10 + 3 + (4 - 1) + (2 - 1)
    assert counts[-1] == s.num_steps
    assert s.num_steps == 4  # prefill; a+b; a; a
    assert counts[0] == 2  # the two 1-token steps
    assert counts[1] == 3  # ... and the 2-token step (le=8)
    assert counts[2] == 4  # ... and the 13-token prefill (le=16)


def test_cache_and_lora_facts():
    engine, _ = make_engine(num_blocks=50, block_size=4, enable_lora=True, max_loras=3)
    sched = engine.scheduler
    s = sched.stats()
    assert (s.block_size, s.num_total_blocks, s.enable_prefix_caching) == (4, 50, True)
    assert s.max_loras == 3
    assert list(s.running_lora_adapters) == [] and list(s.waiting_lora_adapters) == []
    for rid, name in (("x", "beta"), ("y", "alpha"), ("z", "beta")):
        req = gen_request(rid, [1, 2, 3], 2)
        req.lora_name, req.lora_path = name, f"/adapters/{name}"
        sched.add_request(req)
    s = sched.stats()
    assert list(s.waiting_lora_adapters) == ["alpha", "beta"]  # sorted, each once
    engine.step()
    s = sched.stats()
    assert list(s.running_lora_adapters) == ["alpha", "beta"]
    assert list(s.waiting_lora_adapters) == []
    off, _ = make_engine(enable_prefix_caching=False)
    s = off.scheduler.stats()
    assert s.max_loras == 0 and not s.enable_prefix_caching
