"""BambaForCausalLM (hybrid: Mamba2 mixers and one attention layer) in the in-process engine
against transformers on the same tiny random weights (float32, CPU). A running request holds
paged KV blocks for the attention layer and a state slot for the mixers: prompts of 40-300
tokens run concurrently, prefill chunks cut through them, a small block budget forces
preemption (recompute of blocks and state alike), and both kinds come back when idle."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.protos import worker_pb2
from splitserve.testing.mamba2_model import build_bamba

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 12
LENGTHS = [40, 300, 117, 64]
Kind = worker_pb2.LayerCacheSpec.Kind


def _prompts():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def bamba_path(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("bamba") / "tiny-bamba"
    return build_bamba(out, tokenizer_dir=model_factory("llama"), attn_layer_indices=(1,))


@pytest.fixture(scope="module")
def hf_ref(bamba_path):
    return hf_greedy_logprobs(hf_model(bamba_path), PROMPTS, N_TOKENS, 5)


@pytest.mark.parametrize(
    "engine_kw",
    [
        {"max_num_batched_tokens": 2048},
        # Chunks of at most 48 tokens; 26 blocks of 16 tokens cannot hold the four at once.
        {"max_num_batched_tokens": 48, "num_gpu_blocks_override": 26},
    ],
    ids=["whole", "chunked-preempted"],
)
def test_hybrid_matches_transformers(bamba_path, hf_ref, engine_kw):
    llm = LLM(str(bamba_path), kv_cache_memory=1 << 20, max_model_len=512, **engine_kw)
    try:
        specs = llm.engine.executor.runner.describe(16).cache_specs
        assert [s.kind for s in specs] == [
            Kind.KIND_RECURRENT_STATE,
            Kind.KIND_FULL_ATTENTION,
            Kind.KIND_RECURRENT_STATE,
        ]
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        got = []
        for o in outs:
            c = o.outputs[0]
            tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
            got.append((list(c.token_ids), tops))
        assert [t for t, _ in got] == [t for t, _ in hf_ref]
        check_logprobs_close(hf_ref, got, "transformers", "splitserve")
        s = llm.engine.scheduler
        if "num_gpu_blocks_override" in engine_kw:
            assert s.num_preemptions > 0
        assert s.kv.num_state_slots > 0
        assert s.kv.num_free_state_slots == s.kv.num_state_slots
        assert s.kv.num_free_blocks == s.kv.pool.num_blocks
    finally:
        llm.shutdown()


def test_hybrid_prefix_hit_restores_blocks_and_state(bamba_path, hf_ref):
    """The same prompt twice: the second takes the attention blocks and the mixers' state
    snapshot of the cached prefix together, and still matches."""
    llm = LLM(str(bamba_path), kv_cache_memory=1 << 20, max_model_len=512, block_size=16)
    try:
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
        for expected_cached in (0, 112):  # 117 tokens: 7 blocks of 16
            out = llm.generate([{"prompt_token_ids": PROMPTS[2]}], params)
            c = out[0].outputs[0]
            tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
            assert out[0].num_cached_tokens == expected_cached
            assert list(c.token_ids) == hf_ref[2][0]
            check_logprobs_close(hf_ref[2:3], [(list(c.token_ids), tops)], "transformers", "ours")
    finally:
        llm.shutdown()
