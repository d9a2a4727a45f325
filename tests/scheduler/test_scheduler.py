from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from splitserve.protos import common_pb2
from splitserve.scheduler.prefix_cache import ROOT_HASH, hash_block
from splitserve.scheduler.scheduler import RequestRejected

from .utils import gen_request, make_engine, prompts, run_to_completion

STOP = common_pb2.FinishReason.FINISH_REASON_STOP
LENGTH = common_pb2.FinishReason.FINISH_REASON_LENGTH


def reference_outputs(ps, max_tokens=8, **kw):
    """Each prompt alone on an ample cache: the ground truth for batched runs."""
    out = {}
    for i, p in enumerate(ps):
        engine, _ = make_engine(num_blocks=512, enable_prefix_caching=False, **kw)
        engine.scheduler.add_request(gen_request(f"r{i}", p, max_tokens))
        out.update(run_to_completion(engine))
    return out


def test_scheduler_runs_with_torch_blocked():
    """In a fresh interpreter where `import torch` fails, the scheduler package imports and
    runs an engine over the fake worker."""
    root = pathlib.Path(__file__).resolve().parents[2]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        # Appended, not prepended: the root's folders must not shadow installed packages.
        f"sys.path.append({str(root)!r})\n"
        "import splitserve.scheduler.server, splitserve.scheduler.engine_loop\n"
        "from tests.scheduler.utils import gen_request, make_engine, run_to_completion\n"
        "e, _ = make_engine()\n"
        "e.scheduler.add_request(gen_request('a', [5, 6, 7], 4))\n"
        "assert len(run_to_completion(e)['a'][0]) == 4\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("depth", [1, 2])
def test_batched_equals_alone_and_no_block_leak(depth):
    ps = prompts(12)
    ref = reference_outputs(ps)
    engine, _ = make_engine(num_blocks=200, async_scheduling_depth=depth)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p))
    got = run_to_completion(engine)
    assert got == ref
    assert all(len(t) == 8 and r == LENGTH for t, r in got.values())
    assert engine.scheduler.kv.num_free_blocks == 200
    assert not engine.scheduler.requests


def test_token_budget_and_max_num_seqs_held_every_step():
    ps = prompts(20, 10, 60, seed=1)
    engine, ex = make_engine(num_blocks=400, max_num_batched_tokens=32, max_num_seqs=5)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p))

    def check(e):
        assert len(e.scheduler.running) <= 5

    got = run_to_completion(engine, on_step=check)
    for step in ex.steps:
        assert sum(step.num_scheduled_tokens.values()) <= 32
        assert len(step.num_scheduled_tokens) <= 5
    # Chunked prefill happened: some new request was sent with fewer tokens than its prompt.
    assert any(
        step.num_scheduled_tokens[m.request_id] < len(m.token_ids)
        for step in ex.steps
        for m in step.new_requests
    )
    assert got == reference_outputs(ps)


def test_preemption_by_recompute_keeps_outputs_correct():
    ps = prompts(8, 10, 30, seed=2)
    ref = reference_outputs(ps, max_tokens=24)
    # 24 blocks of 4 tokens cannot hold 8 requests of up to 54 tokens at once.
    engine, _ = make_engine(num_blocks=24, async_scheduling_depth=2)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, 24))
    got = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    assert got == ref
    assert engine.scheduler.kv.num_free_blocks == 24


@pytest.mark.parametrize("depth,pp", [(1, 1), (2, 1), (1, 2)])
def test_deferred_requests_sample_later_with_the_same_outputs(depth, pp):
    """A worker may defer a request at its sampling position (its grammar still compiling):
    no token, the position computed again later. With async planning, pipeline ranks and
    preemption, every output equals the run without deferrals and every block comes back."""
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.scheduler.engine_core import EngineCore

    from .fake_worker import FakeWorkerExecutor

    ps = prompts(8, 10, 30, seed=4)
    ref = reference_outputs(ps, max_tokens=16)
    ex = FakeWorkerExecutor(24, pipeline_parallel_size=pp)
    ex.defer_first = {f"r{i}": i % 4 for i in range(len(ps))}
    engine = EngineCore(SchedulerConfig(block_size=4, async_scheduling_depth=depth), ex)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, 16))
    got = run_to_completion(engine)
    assert ex.num_deferred >= 12 and engine.scheduler.num_preemptions > 0
    assert got == ref
    assert engine.scheduler.kv.num_free_blocks == 24 and not engine.scheduler.requests


def test_abort_frees_everything_running_and_waiting():
    ps = prompts(6, 20, 30, seed=3)
    engine, ex = make_engine(num_blocks=40, max_num_seqs=2)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p, 50))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.running and engine.scheduler.waiting
    assert engine.scheduler.kv.num_free_blocks < 40
    for i in range(6):
        assert engine.scheduler.abort_request(f"r{i}")
    assert not engine.scheduler.abort_request("r0")
    while engine.has_work:
        engine.step()
    assert engine.scheduler.kv.num_free_blocks == 40
    # The workers are told to forget the aborted requests.
    engine.scheduler.add_request(gen_request("after", [7, 8, 9], 2))
    run_to_completion(engine)
    told = {rid for s in ex.steps for rid in s.finished_request_ids}
    assert {"r0", "r1"} <= told


def test_prefix_cache_hits_and_shared_blocks_give_same_outputs():
    shared = list(range(100, 133))  # 33 tokens: 8 full blocks of 4
    a, b = shared + [5, 6], shared + [7, 8, 9]
    ref = reference_outputs([a, b])
    engine, ex = make_engine(num_blocks=100)
    engine.scheduler.add_request(gen_request("r0", a))
    run_to_completion(engine)
    engine.scheduler.add_request(gen_request("r1", b))
    hits_before = engine.scheduler.kv.prefix_hits
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert engine.scheduler.kv.prefix_hits - hits_before == 32
    first = next(o for o in outs if o.request_id == "r1")
    assert first.num_cached_tokens == 32
    new = [m for s in ex.steps for m in s.new_requests if m.request_id == "r1"][0]
    assert new.num_computed_tokens == 32
    assert [o.token_ids for o in outs if o.request_id == "r1"] and sum(
        (o.token_ids for o in outs), []
    ) == ref["r1"][0]
    assert engine.scheduler.kv.num_free_blocks == 100


def test_full_prompt_hit_still_computes_last_token():
    p = list(range(200, 216))  # exactly 4 full blocks
    engine, ex = make_engine(num_blocks=50)
    engine.scheduler.add_request(gen_request("a", p, 3))
    run_to_completion(engine)
    engine.scheduler.add_request(gen_request("b", p, 3))
    got = run_to_completion(engine)
    new_b = [m for s in ex.steps for m in s.new_requests if m.request_id == "b"][0]
    assert new_b.num_computed_tokens == 12  # the block holding the last token is recomputed
    assert got["b"][0] == reference_outputs([p], 3)["r0"][0]


def test_two_tenants_same_prefix_in_same_step():
    shared = list(range(300, 320))
    ps = [shared + [1, 2, 3], shared + [4, 5]]
    ref = reference_outputs(ps)
    engine, _ = make_engine(num_blocks=60)
    for i, p in enumerate(ps):
        engine.scheduler.add_request(gen_request(f"r{i}", p))
    assert run_to_completion(engine) == ref


def test_prefix_hashes_are_sha256_chains():
    h1 = hash_block(ROOT_HASH, [1, 2, 3, 4])
    h2 = hash_block(h1, [5, 6, 7, 8])
    assert len(h1) == 32 and h2 != hash_block(ROOT_HASH, [5, 6, 7, 8])
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], b"lora-a") != h1


def test_evicted_cached_blocks_are_reused_lru():
    engine, _ = make_engine(num_blocks=10)
    engine.scheduler.add_request(gen_request("a", list(range(10, 26)), 1))
    run_to_completion(engine)
    pool = engine.scheduler.kv.pool
    assert len(pool._cached) == 4 and pool.num_free_blocks == 10
    # A request needing all 10 blocks evicts the cached ones.
    engine.scheduler.add_request(gen_request("b", list(range(500, 538)), 1))
    run_to_completion(engine)
    assert pool.num_free_blocks == 10


def test_stop_rules():
    engine, ex = make_engine(eos=(2,))
    ex.force_token = {
        "eos": [9, 2, 9, 9],
        "mint": [2, 9, 2, 9, 9],
        "ign": [2, 2, 2],
        "stoptok": [9, 7, 9],
    }
    engine.scheduler.add_request(gen_request("eos", [5, 6], 4))
    engine.scheduler.add_request(gen_request("mint", [5, 6], 5, min_tokens=2))
    engine.scheduler.add_request(gen_request("ign", [5, 6], 3, ignore_eos=True))
    engine.scheduler.add_request(gen_request("stoptok", [5, 6], 3, stop_token_ids=[7]))
    got = run_to_completion(engine)
    assert got["eos"] == ([9, 2], STOP)
    assert got["mint"] == ([2, 9, 2], STOP)
    assert got["ign"] == ([2, 2, 2], LENGTH)
    assert got["stoptok"] == ([9, 7], STOP)


def test_max_model_len_caps_output():
    engine, _ = make_engine(max_model_len=20)
    r = gen_request("a", list(range(5, 15)), 0)
    r.sampling_params.max_tokens = None
    engine.scheduler.add_request(r)
    got = run_to_completion(engine)
    assert len(got["a"][0]) == 10 and got["a"][1] == LENGTH


@pytest.mark.parametrize(
    "prompt,kw,needle",
    [
        ([], {}, "at least one token"),
        ([5, -1], {}, "-1"),
        ([5, 1000], {}, "1000"),
        (list(range(5, 25)), {}, "20"),
        (list(range(5, 15)), {"max_tokens": 11}, "(10 tokens) plus max_tokens (11)"),
        ([5], {"logprobs": 21}, "logprobs"),
    ],
)
def test_rejections_name_the_numbers(prompt, kw, needle):
    engine, _ = make_engine(max_model_len=20)
    max_tokens = kw.pop("max_tokens", 4)
    with pytest.raises(RequestRejected) as e:
        engine.scheduler.add_request(gen_request("x", prompt, max_tokens, **kw))
    assert e.value.code == "INVALID_ARGUMENT" and needle in e.value.message
    assert not engine.scheduler.requests


def test_waiting_queue_full_is_resource_exhausted():
    engine, _ = make_engine(max_waiting_requests=2)
    engine.scheduler.add_request(gen_request("a", [5, 6]))
    engine.scheduler.add_request(gen_request("b", [5, 6]))
    with pytest.raises(RequestRejected) as e:
        engine.scheduler.add_request(gen_request("c", [5, 6]))
    assert e.value.code == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("seed", range(6))
def test_random_arrivals_aborts_and_tiny_cache(seed):
    """Requests arrive over time, some are aborted, the cache is tight: every request that
    finishes has the same tokens as when run alone, and no block leaks."""
    import random

    rng = random.Random(seed)
    ps = prompts(14, 2, 30, seed=seed)
    lens = [rng.randint(1, 20) for _ in ps]
    ref = {f"r{i}": reference_outputs([p], lens[i])["r0"] for i, p in enumerate(ps)}
    engine, _ = make_engine(
        num_blocks=16,
        max_num_batched_tokens=rng.choice([8, 16, 64]),
        max_num_seqs=rng.choice([2, 4, 8]),
        async_scheduling_depth=rng.choice([1, 2]),
    )
    pending = list(enumerate(ps))
    aborted, outs, reasons = set(), {}, {}
    while pending or engine.has_work:
        if pending and rng.random() < 0.5:
            i, p = pending.pop(0)
            engine.scheduler.add_request(gen_request(f"r{i}", p, lens[i]))
        if engine.scheduler.requests and rng.random() < 0.05:
            victim = rng.choice(sorted(engine.scheduler.requests))
            engine.scheduler.abort_request(victim)
            aborted.add(victim)
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert engine.scheduler.kv.num_free_blocks == 16
    for rid, (toks, _) in ref.items():
        if rid in aborted:
            assert outs.get(rid, []) == toks[: len(outs.get(rid, []))]
        else:
            assert outs[rid] == toks, rid
