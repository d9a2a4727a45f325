"""ModelRunner step semantics: state across steps, errors, preemption, seeds, pipeline ranks."""

from __future__ import annotations

import pytest
import torch

from splitserve.common import messages as msg
from splitserve.kernels import torch_paged_decode
from splitserve.worker.config import WorkerConfig
from splitserve.worker.model_runner import ModelRunner
from splitserve.worker.pipeline import IntermediateTensors

BS = 4
PROMPT = [5, 9, 13, 17, 21, 25, 29]


@pytest.fixture(scope="module")
def runner(tiny_llama):
    runner = ModelRunner(WorkerConfig(model=str(tiny_llama), kv_cache_memory=1 << 20))
    runner.initialize_cache(64, BS)
    return runner


def _new(rid, tokens, blocks, computed=0, num_prompt=None, **params):
    params.setdefault("temperature", 0)
    return msg.NewRequest(
        request_id=rid,
        token_ids=tokens,
        block_ids=blocks,
        num_computed_tokens=computed,
        num_prompt_tokens=len(tokens) if num_prompt is None else num_prompt,
        sampling_params=msg.SamplingParams(**params),
    )


def _decode(rid, computed, new_blocks=()):
    return msg.CachedRequest(
        request_id=rid, num_computed_tokens=computed, new_block_ids=list(new_blocks)
    )


def _generate(runner, rid, prompt, n, blocks, first_step=0, **params):
    """Prefill then n - 1 decodes of one request; returns its tokens."""
    res = runner.execute(
        msg.StepRequest(
            step_id=first_step,
            new_requests=[_new(rid, prompt, blocks, **params)],
            num_scheduled_tokens={rid: len(prompt)},
        )
    )
    tokens = list(res.token_ids)
    for i in range(1, n):
        res = runner.execute(
            msg.StepRequest(
                step_id=first_step + i,
                cached_requests=[_decode(rid, len(prompt) + i - 1)],
                num_scheduled_tokens={rid: 1},
            )
        )
        tokens += list(res.token_ids)
    runner.execute(msg.StepRequest(step_id=first_step + n, finished_request_ids=[rid]))
    return tokens


def test_describe_reports_model_and_memory(runner, tiny_llama):
    d = runner.describe(16)
    assert (d.rank, d.world_size, d.vocab_size, d.max_model_len) == (0, 1, 96, 256)
    assert list(d.eos_token_ids) == [2, 5]
    head_dim = 32 // 4
    assert d.bytes_per_block == 2 * 3 * 16 * 2 * head_dim * 4  # k+v, layers, bs, kv heads, D, fp32
    assert d.model == str(tiny_llama)
    fresh = ModelRunner(WorkerConfig(model=str(tiny_llama), kv_cache_memory=12345))
    assert fresh.describe(16).available_kv_bytes == 12345


def test_cpu_caches_are_read_in_place(runner):
    """A CPU float32 worker allocates every layer's cache for the in-place decode path."""
    assert all(torch_paged_decode.supports(k, v) for k, v in runner.kv_cache.caches)


def test_warm_up_leaves_no_request_behind(runner):
    assert len(runner.batch) == 0


def test_step_result_shape_and_partial_chunks(runner):
    step = msg.StepRequest(
        step_id=7,
        new_requests=[_new("whole", PROMPT, [0, 1], logprobs=2), _new("chunked", PROMPT, [2, 3])],
        num_scheduled_tokens={"whole": len(PROMPT), "chunked": 3},
    )
    res = runner.execute(step)
    assert res.step_id == 7
    assert list(res.request_ids) == ["whole"]  # a partial chunk samples nothing
    assert len(res.token_ids) == len(res.logprobs) == 1
    assert len(res.logprobs[0].top_token_ids) == 2 and res.logprobs[0].token_id == res.token_ids[0]
    res = runner.execute(
        msg.StepRequest(
            step_id=8,
            cached_requests=[_decode("whole", len(PROMPT)), _decode("chunked", 3)],
            num_scheduled_tokens={"whole": 1, "chunked": len(PROMPT) - 3},
        )
    )
    assert sorted(res.request_ids) == ["chunked", "whole"]
    by_id = dict(zip(res.request_ids, res.logprobs, strict=True))
    assert by_id["chunked"] is None  # did not ask
    runner.execute(msg.StepRequest(step_id=9, finished_request_ids=["whole", "chunked"]))
    assert len(runner.batch) == 0


def test_bad_requests_fail_alone(runner):
    step = msg.StepRequest(
        step_id=1,
        new_requests=[
            _new("ok", PROMPT, [0, 1]),
            _new("oov", [1, 96, 3], [2]),
            _new("negative", [1, -4], [3]),
            _new("noblocks", PROMPT, []),
            _new("greedy", PROMPT, [4, 5], logprobs=21),
            _new("nucleus", PROMPT, [6, 7], temperature=1.0, top_p=0.0),
        ],
        num_scheduled_tokens={
            "ok": len(PROMPT),
            "oov": 3,
            "negative": 2,
            "ghost": 2,
            "noblocks": len(PROMPT),
            "greedy": len(PROMPT),
            "nucleus": len(PROMPT),
        },
    )
    res = runner.execute(step)
    assert list(res.request_ids) == ["ok"]
    assert "96" in res.errors["oov"] and "-4" in res.errors["negative"]
    assert "not known" in res.errors["ghost"]
    assert "blocks" in res.errors["noblocks"]
    assert "logprobs must be between 0 and 20, got 21" in res.errors["greedy"]
    assert "top_p" in res.errors["nucleus"]
    assert set(runner.batch.rows) == {"ok"}
    # forgotten requests are forgotten; unknown finished ids are ignored
    res = runner.execute(
        msg.StepRequest(
            step_id=2, finished_request_ids=["ok", "never-seen"], num_scheduled_tokens={"ok": 1}
        )
    )
    assert "not known" in res.errors["ok"] and len(runner.batch) == 0


def test_decode_input_is_the_token_sampled_last_step(runner, tiny_llama):
    from .utils import hf_logits

    tokens = _generate(runner, "g", PROMPT, 6, [0, 1, 2, 3])
    expected = list(PROMPT)
    for _ in range(6):  # transformers greedy over the growing sequence
        expected.append(int(hf_logits(tiny_llama, expected)[-1].argmax()))
    assert tokens == expected[len(PROMPT) :]


def test_resumed_after_preemption_continues_the_same_sequence(runner):
    full = _generate(runner, "a", PROMPT, 8, [0, 1, 2, 3])
    # preempted after 3 outputs: resumed as a new request carrying them, recomputed from 0
    resumed = msg.StepRequest(
        step_id=20,
        new_requests=[
            _new("a", PROMPT + full[:3], [10, 11, 12, 13], num_prompt=len(PROMPT), min_tokens=4)
        ],
        num_scheduled_tokens={"a": len(PROMPT) + 3},
    )
    res = runner.execute(resumed)
    assert list(res.token_ids) == [full[3]]
    assert runner.batch.num_prompt[runner.batch.rows["a"]] == len(PROMPT)
    runner.execute(msg.StepRequest(step_id=21, finished_request_ids=["a"]))


def test_min_tokens_counts_outputs_kept_across_preemption(runner):
    batch = runner.batch
    batch.add(_new("m", PROMPT + [1, 2, 3], [0, 1, 2], num_prompt=len(PROMPT), min_tokens=4))
    row = batch.rows["m"]
    import numpy as np

    meta = batch.sampling_metadata(np.array([row]), runner.eos_token_ids)
    assert sorted(meta.masked_cols.tolist()) == [2, 5]  # both EOS ids: 3 outputs < 4
    batch.remove("m")


def test_seeded_request_ignores_its_neighbours(runner):
    params = dict(temperature=1.0, seed=1234)
    alone = _generate(runner, "s", PROMPT, 10, [0, 1, 2, 3], **params)
    # the same request, now beside others (one seeded differently, one unseeded)
    others = [
        _new("x", [7, 7, 7], [20], temperature=1.0),
        _new("y", PROMPT[:5], [21, 22], temperature=0.8, seed=9),
    ]
    res = runner.execute(
        msg.StepRequest(
            step_id=0,
            new_requests=[*others, _new("s", PROMPT, [0, 1, 2, 3], **params)],
            num_scheduled_tokens={"x": 3, "y": 5, "s": len(PROMPT)},
        )
    )
    got = [dict(zip(res.request_ids, res.token_ids, strict=True))["s"]]
    for i in range(1, 10):
        res = runner.execute(
            msg.StepRequest(
                step_id=i,
                cached_requests=[
                    _decode("x", 3 + i - 1),
                    _decode("y", 5 + i - 1),
                    _decode("s", len(PROMPT) + i - 1),
                ],
                num_scheduled_tokens={"x": 1, "y": 1, "s": 1},
            )
        )
        got.append(dict(zip(res.request_ids, res.token_ids, strict=True))["s"])
    runner.execute(msg.StepRequest(step_id=10, finished_request_ids=["x", "y", "s"]))
    assert got == alone
    assert _generate(runner, "s2", PROMPT, 10, [0, 1, 2, 3], temperature=1.0, seed=4321) != alone


def test_two_pipeline_ranks_reproduce_one(runner, tiny_llama):
    ranks = [
        ModelRunner(
            WorkerConfig(
                model=str(tiny_llama), kv_cache_memory=1 << 20, rank=r, pipeline_parallel_size=2
            )
        )
        for r in range(2)
    ]
    for r in ranks:
        r.initialize_cache(64, BS)
    assert ranks[0].model.lm_head is None and ranks[1].model.model.embed_tokens is None
    params = dict(temperature=0, logprobs=1)
    steps = [
        msg.StepRequest(
            step_id=0,
            new_requests=[
                _new("p", PROMPT, [0, 1, 2, 3], **params),
                _new("q", PROMPT[:3], [4, 5], **params),
            ],
            num_scheduled_tokens={"p": len(PROMPT), "q": 3},
        )
    ]
    for i in range(1, 5):
        steps.append(
            msg.StepRequest(
                step_id=i,
                cached_requests=[_decode("p", len(PROMPT) + i - 1), _decode("q", 2 + i)],
                num_scheduled_tokens={"p": 1, "q": 1},
            )
        )
    for step in steps:
        single = runner.execute(step)
        hidden = ranks[0].execute(step)
        assert isinstance(hidden, IntermediateTensors)
        split = ranks[1].execute(step, hidden)
        ranks[0].record_sampled(list(split.request_ids), list(split.token_ids))
        assert dict(zip(split.request_ids, split.token_ids, strict=True)) == dict(
            zip(single.request_ids, single.token_ids, strict=True)
        )
        for a, b in zip(
            sorted(split.logprobs, key=lambda x: x.token_id),
            sorted(single.logprobs, key=lambda x: x.token_id),
            strict=True,
        ):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    runner.execute(msg.StepRequest(step_id=9, finished_request_ids=["p", "q"]))


def test_execute_before_initialize_cache_fails(tiny_llama):
    fresh = ModelRunner(WorkerConfig(model=str(tiny_llama)))
    with pytest.raises(RuntimeError, match="initialize_cache"):
        fresh.execute(msg.StepRequest())


def test_logits_only_for_sampled_positions(runner, monkeypatch):
    seen = []
    original = runner.model.compute_logits

    def spy(hidden):
        seen.append(hidden.shape[0])
        return original(hidden)

    monkeypatch.setattr(runner.model, "compute_logits", spy)
    runner.execute(
        msg.StepRequest(
            step_id=0,
            new_requests=[
                _new("l1", PROMPT, [0, 1]),
                _new("l2", PROMPT, [2, 3]),
                _new("l3", PROMPT, [4, 5], prompt_logprobs=1),
            ],
            num_scheduled_tokens={"l1": len(PROMPT), "l2": 4, "l3": len(PROMPT)},
        )
    )
    # l1 samples (1 row), l2 is a partial chunk (0), l3 samples + 6 prompt positions
    assert seen == [1 + 1 + len(PROMPT) - 1]
    runner.execute(msg.StepRequest(step_id=1, finished_request_ids=["l1", "l2", "l3"]))
    assert torch.is_inference_mode_enabled() is False


@pytest.mark.parametrize("rank", [0, 1])
def test_profile_forward_runs_without_a_cache(tiny_llama, rank):
    # The CUDA memory profile's forward, exercised on CPU: the largest step, no KV cache.
    fresh = ModelRunner(
        WorkerConfig(
            model=str(tiny_llama),
            max_num_batched_tokens=300,
            max_num_seqs=4,
            max_model_len=128,
            rank=rank,
            pipeline_parallel_size=2,
        )
    )
    assert fresh.kv_cache is None
    fresh.profile_forward()
