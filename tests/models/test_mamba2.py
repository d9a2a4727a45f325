"""Mamba2ForCausalLM in the in-process engine (real scheduler, real worker) against
transformers' Mamba2 on the same tiny random weights (float32, CPU): greedy tokens identical,
top-k logprobs within the parity rule. Prompts of 40-300 tokens run concurrently (states
batched over slots), prefill chunks cut through them, a small block budget forces preemption
(recompute), a small state budget limits the slots, n = 2 runs two sequences per prompt, and
a prefix-cache hit starts from a state snapshot."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.testing.mamba2_model import build_mamba2

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 16
LENGTHS = [40, 300, 117, 64, 203]


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = _prompts(LENGTHS)


@pytest.fixture(scope="module")
def mamba2_path(model_factory, tmp_path_factory):
    # The session's tokenizer (model_factory trained it for the llama checkpoint).
    tokenizer_dir = model_factory("llama")
    out = tmp_path_factory.mktemp("mamba2") / "tiny-mamba2"
    # chunk_size 32: transformers' scan and ours both cut every prompt into several chunks.
    return build_mamba2(out, tokenizer_dir=tokenizer_dir, num_layers=2, chunk_size=32)


@pytest.fixture(scope="module")
def hf_ref(mamba2_path):
    return hf_greedy_logprobs(hf_model(mamba2_path), PROMPTS, N_TOKENS, 5)


def _engine_logprobs(outs, index=0) -> list:
    res = []
    for o in outs:
        c = o.outputs[index]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        res.append((list(c.token_ids), tops))
    return res


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5, **kw)


def _check(hf_ref, got):
    assert [t for t, _ in got] == [t for t, _ in hf_ref]
    check_logprobs_close(hf_ref, got, "transformers", "splitserve")


def _idle(llm):
    kv = llm.engine.scheduler.kv
    assert kv.num_free_state_slots == kv.num_state_slots > 0
    assert kv.num_free_blocks == kv.pool.num_blocks


@pytest.mark.parametrize(
    "engine_kw",
    [
        {"max_num_batched_tokens": 2048},
        # Prefill chunks of at most 48 tokens (with decodes of other requests in the same step):
        # every prompt is cut, and the state is carried from chunk to chunk.
        {"max_num_batched_tokens": 48},
    ],
    ids=["whole", "chunked"],
)
def test_concurrent_prompts_match_transformers(mamba2_path, hf_ref, engine_kw):
    llm = LLM(str(mamba2_path), kv_cache_memory=1 << 20, max_model_len=512, **engine_kw)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())
        _check(hf_ref, _engine_logprobs(outs))
        _idle(llm)
    finally:
        llm.shutdown()


def test_preemption_and_few_slots_still_match(mamba2_path, hf_ref):
    # Two state slots (about 21 KiB each): three of the five prompts wait for a slot. And 26
    # blocks of 16 tokens cannot hold two long requests: the scheduler preempts and the worker
    # recomputes the state from the prompt.
    llm = LLM(
        str(mamba2_path),
        kv_cache_memory=45_000,
        num_gpu_blocks_override=26,
        max_model_len=512,
        max_num_batched_tokens=64,
    )
    try:
        assert llm.engine.scheduler.kv.num_state_slots == 2
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy())
        _check(hf_ref, _engine_logprobs(outs))
        assert llm.engine.scheduler.num_preemptions > 0
        _idle(llm)
    finally:
        llm.shutdown()


def test_n2_both_sequences_match(mamba2_path, hf_ref):
    llm = LLM(str(mamba2_path), kv_cache_memory=1 << 20, max_model_len=512)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], _greedy(n=2))
        for index in (0, 1):
            _check(hf_ref[:3], _engine_logprobs(outs, index))
        # The second sequence of each prompt copied the first's state snapshot.
        assert llm.engine.scheduler.kv.num_snapshot_hits == 3
        _idle(llm)
    finally:
        llm.shutdown()


def test_prefix_cache_hit_restores_the_state_snapshot(mamba2_path, hf_ref):
    """The same prompt twice: the second starts from the state snapshot at the prompt's last
    block boundary, reports those tokens as cached, and still matches; so does a longer
    prompt that extends the first one's prompt and output (a second turn)."""
    llm = LLM(str(mamba2_path), kv_cache_memory=1 << 20, max_model_len=512, block_size=16)
    try:
        assert llm.engine.scheduler.kv.enable_caching
        cached = []
        for _ in range(2):
            out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], _greedy())
            cached.append(out[0].num_cached_tokens)
            _check(hf_ref[1:2], _engine_logprobs(out))
        assert cached == [0, 288]  # 300 tokens: 18 blocks of 16
        turn2 = PROMPTS[1] + list(out[0].outputs[0].token_ids) + [5, 6, 7]
        ref2 = hf_greedy_logprobs(hf_model(mamba2_path), [turn2], N_TOKENS, 5)
        out2 = llm.generate([{"prompt_token_ids": turn2}], _greedy())
        assert out2[0].num_cached_tokens == 288
        _check(ref2, _engine_logprobs(out2))
        assert llm.engine.scheduler.kv.state.num_snapshots_taken >= 2
    finally:
        llm.shutdown()


def test_triton_kernels_in_the_engine_match(mamba2_path, hf_ref, monkeypatch):
    """The dispatcher's Triton side (conv, scan, state update; the interpreter on CPU) inside
    the engine: chunked prefill, decodes and a fresh one-token prompt batched together."""
    from splitserve.kernels import dispatch

    calls: list[str] = []
    real = dispatch._kernel_module

    def kernel_module(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "_use_triton", lambda t, backend: True)
    monkeypatch.setattr(dispatch, "_kernel_module", kernel_module)
    llm = LLM(
        str(mamba2_path), kv_cache_memory=1 << 20, max_model_len=512, max_num_batched_tokens=24
    )
    try:
        prompts = [PROMPTS[0], PROMPTS[3], [PROMPTS[2][0]]]
        ref = hf_greedy_logprobs(hf_model(mamba2_path), prompts, 6, 5)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5),
        )
        _check(ref, _engine_logprobs(outs))
    finally:
        llm.shutdown()
    assert {"causal_conv1d", "ssd_scan"} <= set(calls)


def test_a_compiling_grammar_never_recomputes_a_position(mamba2_path):
    """An attention model defers a row whose grammar is still compiling and computes its last
    position again; that would fold the position into a recurrent state twice. A Mamba2 step
    waits for the compile instead: with the grammar reported as compiling at the first two
    sampling positions, tokens and logprobs equal those of a run with it compiled already."""
    from splitserve import StructuredOutputsParams

    llm = LLM(str(mamba2_path), kv_cache_memory=1 << 20, max_model_len=512)
    try:
        params = SamplingParams(
            max_tokens=10,
            temperature=0,
            logprobs=5,
            structured_outputs=StructuredOutputsParams(
                backend="xgrammar", regex="[a-z]+( [a-z]+)*"
            ),
        )
        prompt = {"prompt_token_ids": PROMPTS[0]}
        (compiled,) = llm.generate([prompt], params)
        runner = llm.engine.executor.runner
        real, calls = runner.structured.compiling, []

        def compiling(rids):
            calls.append(rids)
            return list(range(len(rids))) if len(calls) <= 2 else real(rids)

        runner.structured.compiling = compiling
        (again,) = llm.generate([prompt], params)
        a, b = compiled.outputs[0], again.outputs[0]
        assert a.token_ids == b.token_ids and len(a.token_ids) > 1
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.top_token_ids == y.top_token_ids
            torch.testing.assert_close(
                torch.tensor(x.top_logprobs), torch.tensor(y.top_logprobs), atol=1e-5, rtol=0
            )
        assert not runner.deferred_ids
    finally:
        llm.shutdown()
