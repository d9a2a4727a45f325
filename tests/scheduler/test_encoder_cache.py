"""The scheduler's encoder-output cache (torch blocked, fake worker): outputs are kept by item
hash across requests, each step's encoder work stays within --max-num-encoder-input-tokens,
the cache within --encoder-cache-size (least recently used outputs no request needs evicted,
the evictions sent to the worker), and chunks stop before an item that does not fit."""

from __future__ import annotations

import hashlib

import pytest

from splitserve.common import messages as msg
from splitserve.scheduler.encoder_cache import EncoderCache
from splitserve.scheduler.scheduler import RequestRejected

from .utils import gen_request, make_engine, run_to_completion

IMAGE = 900
L = 6  # placeholder tokens per image


def digest(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def mm_request(rid: str, images: list[str], text: int = 5, max_tokens: int = 3):
    """`text` text tokens, then each image's L placeholder tokens followed by 2 text tokens."""
    prompt = list(range(100 + len(rid), 100 + len(rid) + text))
    req = gen_request(rid, prompt, max_tokens)
    for name in images:
        req.mm_inputs.append(
            msg.MultiModalInput(modality="image", hash=digest(name), offset=len(prompt), length=L)
        )
        prompt += [IMAGE] * L + [7, 8]
    req.prompt_token_ids = prompt
    return req


class Recorder:
    """Every step message, and what a worker following them holds and encodes."""

    def __init__(self, sched) -> None:
        self.steps = []
        self.held: set[bytes] = set()
        self.encoded: list[bytes] = []
        self._spans = {}
        original = sched.schedule

        def watch():
            step = original()
            if step is not None:
                self._apply(step, sched)
            return step

        sched.schedule = watch

    def _apply(self, step, sched) -> None:
        self.steps.append(step)
        for h in step.encoder_evictions:
            assert h in self.held, "evicted an output the worker does not hold"
            self.held.discard(h)
        for m in step.new_requests:
            self._spans[m.request_id] = [(x.offset, x.length, x.hash) for x in m.mm_inputs]
        work = 0
        for rid, n in step.num_scheduled_tokens.items():
            start = sched.requests[rid].num_computed_tokens - n
            for offset, length, h in self._spans.get(rid, ()):
                if offset < start + n and offset + length > start and h not in self.held:
                    self.held.add(h)  # what the worker does: encode what it does not hold
                    self.encoded.append(h)
                    work += length
        cache = sched.encoder
        assert work <= cache.budget and len(self.held) * L <= cache.cache_size
        assert {h for h in self.held} == set(cache.entries)  # the table is the worker's


def test_the_same_image_in_a_later_request_is_not_encoded_again():
    engine, _ = make_engine(num_blocks=200, enable_prefix_caching=False)
    sched = engine.scheduler
    rec = Recorder(sched)
    sched.add_request(mm_request("first", ["cat"]))
    run_to_completion(engine)
    sched.add_request(mm_request("second!", ["cat", "dog"]))  # other text, same cat
    run_to_completion(engine)
    assert rec.encoded == [digest("cat"), digest("dog")]
    stats = sched.stats()
    assert (stats.encoder_cache_queries, stats.encoder_cache_hits) == (3, 1)
    assert stats.encoder_cache_usage == pytest.approx(2 * L / sched.encoder.cache_size)


def test_encoder_budget_cuts_the_chunk_before_an_item():
    # One image's worth of encoder work per step: the second request waits a step for its
    # image, the third (two images in one prompt) is cut between them.
    engine, _ = make_engine(
        num_blocks=200, enable_prefix_caching=False, max_num_encoder_input_tokens=L
    )
    sched = engine.scheduler
    rec = Recorder(sched)
    sched.add_request(mm_request("a", ["1"], text=3))
    sched.add_request(mm_request("b", ["2"], text=3))
    sched.add_request(mm_request("c", ["3", "4"], text=0))
    got = run_to_completion(engine)
    assert all(len(toks) == 3 for toks, _ in got.values())
    first = rec.steps[0].num_scheduled_tokens
    assert first["a"] == 3 + L + 2 and first["b"] == 3  # b stops before its image
    assert "c" not in first  # its image is at offset 0: nothing to run this step
    assert sorted(rec.encoded) == sorted(digest(x) for x in "1234")


def test_cache_evicts_least_recently_used_outputs_no_request_needs():
    engine, _ = make_engine(num_blocks=200, enable_prefix_caching=False, encoder_cache_size=2 * L)
    sched = engine.scheduler
    rec = Recorder(sched)
    for rid, images in (("r1", ["x"]), ("r2", ["y"]), ("r3", ["x"]), ("r4", ["z"])):
        sched.add_request(mm_request(rid, images))
        run_to_completion(engine)
    # x was used again by r3, so y (least recently used) made room for z.
    evicted = [h for s in rec.steps for h in s.encoder_evictions]
    assert evicted == [digest("y")]
    assert set(sched.encoder.entries) == {digest("x"), digest("z")}
    sched.add_request(mm_request("r5", ["y"]))  # evicted: encoded again
    run_to_completion(engine)
    assert rec.encoded == [digest(n) for n in ("x", "y", "z", "y")]


def test_an_output_a_running_request_needs_is_never_evicted():
    # Room for two images; r1's prompt holds two and is prefilled in small chunks while r2
    # and r3 bring others: their chunks wait rather than evict r1's second image.
    engine, _ = make_engine(
        num_blocks=200,
        enable_prefix_caching=False,
        encoder_cache_size=2 * L,
        max_num_batched_tokens=4,
    )
    sched = engine.scheduler
    Recorder(sched)  # asserts the held set against the table every step
    sched.add_request(mm_request("r1", ["p", "q"], text=2, max_tokens=4))
    sched.add_request(mm_request("r2", ["s"], text=2))
    sched.add_request(mm_request("r3", ["t"], text=2))
    got = run_to_completion(engine)
    assert len(got) == 3 and all(len(t) in (3, 4) for t, _ in got.values())
    assert all(not e.refs for e in sched.encoder.entries.values())
    assert sched.kv.num_free_blocks == 200


def test_preemption_and_abort_drop_references():
    engine, _ = make_engine(
        num_blocks=200,
        enable_prefix_caching=False,
        encoder_cache_size=L,
        max_num_batched_tokens=8,
        async_scheduling_depth=1,
    )
    sched = engine.scheduler
    sched.add_request(mm_request("r1", ["a"], max_tokens=20))
    engine.step()  # 8 of its 13 prompt tokens: inside the image
    assert sched.encoder.entries[digest("a")].refs == {"r1"}
    sched.abort_request("r1")
    assert not sched.encoder.entries[digest("a")].refs  # kept for later requests, unreferenced
    sched.add_request(mm_request("r2", ["b"]))  # needs the only slot: a is evicted
    run_to_completion(engine)
    assert list(sched.encoder.entries) == [digest("b")]


def test_an_item_larger_than_the_budgets_is_refused():
    engine, _ = make_engine(encoder_cache_size=L - 1)
    with pytest.raises(RequestRejected, match="encoder-cache-size") as e:
        engine.scheduler.add_request(mm_request("r", ["big"]))
    assert e.value.code == "INVALID_ARGUMENT"


def test_fit_and_commit_agree():
    cache = EncoderCache(cache_size=3 * L, budget=2 * L)
    spans = tuple((10 * i, L, digest(str(i))) for i in range(4))
    cache.begin_step()
    n = cache.fit("r", spans, 0, 40)
    assert n == 20  # two items of budget: the chunk stops at the third
    cache.commit("r", spans, 0, n)
    assert len(cache.entries) == 2 and cache.used == 2 * L
    cache.begin_step()
    # Budget for two more, room for one: r still needs all it holds, so the chunk stops
    # before the fourth item.
    assert cache.fit("r", spans, 20, 20) == 10
    cache.commit("r", spans, 20, 10)
    assert cache.used == 3 * L and cache.take_evictions() == []
    cache.begin_step()
    cache.release_computed("r", spans, 30)  # computed past the first three
    assert cache.fit("r", spans, 30, 10) == 10
    cache.commit("r", spans, 30, 10)
    assert cache.take_evictions() == [digest("0")]  # least recently used, unreferenced
