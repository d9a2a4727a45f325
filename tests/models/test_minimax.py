"""MiniMaxForCausalLM (lightning attention layers with a state per request, a softmax-attention
layer with paged KV blocks, sparse MoE everywhere) in the in-process engine against transformers
on the same tiny random weights (float32, CPU). Prompts of 40-300 tokens run concurrently,
prefill chunks cut through them (the lightning state carried from chunk to chunk), a small
block budget forces preemption (recompute of blocks and state alike), a prefix-cache hit
restores the lightning state from a snapshot, and both cache kinds come back when idle. The
residual alpha / beta factors are not 1, so the post-norm residual wiring is exercised."""

from __future__ import annotations

import functools

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.protos import worker_pb2
from splitserve.testing.minimax_model import build_minimax

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 12
LENGTHS = [40, 300, 117, 64]
Kind = worker_pb2.LayerCacheSpec.Kind


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def minimax_path(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("minimax") / "tiny-minimax"
    return build_minimax(
        out,
        tokenizer_dir=model_factory("llama"),
        linear_attn_alpha_factor=0.9,
        linear_attn_beta_factor=1.1,
        full_attn_alpha_factor=1.2,
        mlp_alpha_factor=0.8,
        mlp_beta_factor=1.25,
    )


@pytest.fixture(scope="module")
def hf_ref(minimax_path):
    return hf_greedy_logprobs(hf_model(minimax_path), PROMPTS, N_TOKENS, 5)


def _got(outs):
    got = []
    for o in outs:
        c = o.outputs[0]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        got.append((list(c.token_ids), tops))
    return got


def _params():
    return SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize(
    "engine_kw",
    [
        {"max_num_batched_tokens": 2048},
        # Chunks of at most 48 tokens; 26 blocks of 16 tokens cannot hold the four at once.
        {"max_num_batched_tokens": 48, "num_gpu_blocks_override": 26},
    ],
    ids=["whole", "chunked-preempted"],
)
def test_minimax_matches_transformers(minimax_path, hf_ref, engine_kw):
    llm = LLM(str(minimax_path), kv_cache_memory=1 << 20, max_model_len=512, **engine_kw)
    try:
        specs = llm.engine.executor.runner.describe(16).cache_specs
        assert [s.kind for s in specs] == [
            Kind.KIND_RECURRENT_STATE,
            Kind.KIND_FULL_ATTENTION,
            Kind.KIND_RECURRENT_STATE,
        ]
        assert list(specs[0].ssm_state_shape) == [4, 16, 16]  # heads, head_dim, head_dim
        got = _got(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _params()))
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


def test_minimax_prefix_hit_restores_blocks_and_state(minimax_path, hf_ref):
    """The same prompt twice: the second takes the attention blocks and the lightning layers'
    state snapshot of the cached prefix together, and still matches."""
    llm = LLM(str(minimax_path), kv_cache_memory=1 << 20, max_model_len=512, block_size=16)
    try:
        for expected_cached in (0, 112):  # 117 tokens: 7 blocks of 16
            out = llm.generate([{"prompt_token_ids": PROMPTS[2]}], _params())
            assert out[0].num_cached_tokens == expected_cached
            got = _got(out)
            assert got[0][0] == hf_ref[2][0]
            check_logprobs_close(hf_ref[2:3], got, "transformers", "splitserve")
    finally:
        llm.shutdown()


def test_decay_tables_in_the_checkpoint_are_not_loaded_as_weights(minimax_path, caplog):
    """transformers saves each lightning layer's decay tables; the model computes them from the
    config, and the loader drops them without a warning per tensor."""
    from safetensors import safe_open

    with safe_open(str(minimax_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.slope_rate" in f.keys()
    llm = LLM(str(minimax_path), kv_cache_memory=1 << 20, max_model_len=256)
    try:
        layer = llm.engine.executor.runner.model.model.layers[0].self_attn
        hf = hf_model(minimax_path).model.layers[0].self_attn
        torch.testing.assert_close(layer.slope, hf.slope_rate.view(-1))
        assert "ignoring checkpoint tensor" not in caplog.text
    finally:
        llm.shutdown()


def test_rope_ignores_partial_rotary_factor_as_transformers_does(model_factory, tmp_path):
    """transformers' MiniMax rotates the whole head even when rope_parameters carries a
    partial_rotary_factor; MiniMax's own configs name a partial rotation `rotary_dim`."""
    from types import SimpleNamespace

    from splitserve.worker.models.minimax import minimax_rope_parameters

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    path = build_minimax(tmp_path / "m", tokenizer_dir=model_factory("llama"), rope_parameters=rope)
    prompt = PROMPTS[0][:60]
    want = hf_greedy_logprobs(hf_model(path), [prompt], 6, 5)
    llm = LLM(str(path), kv_cache_memory=1 << 20, max_model_len=256)
    try:
        out = llm.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        )
        assert list(out[0].outputs[0].token_ids) == want[0][0]
        assert llm.engine.executor.runner.model.model.rotary_emb.rotary_dim == 16
    finally:
        llm.shutdown()
    remote = SimpleNamespace(
        rotary_dim=8, head_dim=16, rope_theta=10000.0, max_position_embeddings=64
    )
    assert minimax_rope_parameters(remote)["partial_rotary_factor"] == 0.5


def test_lightning_state_is_fp32_under_a_half_precision_model(minimax_path):
    """The state sums k^T v over the whole context: it stays fp32 (and the scheduler's slot
    budget counts fp32 bytes) when the model runs in bf16; bf16 decoding still runs."""
    llm = LLM(str(minimax_path), kv_cache_memory=1 << 20, max_model_len=256, dtype="bfloat16")
    try:
        runner = llm.engine.executor.runner
        specs = runner.describe(16).cache_specs
        assert [s.dtype for s in specs] == ["float32", "bfloat16", "float32"]
        assert specs[0].page_bytes == 4 * 16 * 16 * 4
        conv, kv = runner.state_cache.caches[0]
        assert kv.dtype == torch.float32 and conv.numel() == 0
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], _params())
        assert len(out[0].outputs[0].token_ids) == N_TOKENS
        assert kv.abs().sum() > 0  # the prompt's state landed in its (fp32) slot
    finally:
        llm.shutdown()


def test_n2_both_sequences_match(minimax_path, hf_ref):
    """Two sequences per prompt: the second waits one step and copies the first's lightning
    state snapshot instead of computing the prompt again."""
    llm = LLM(str(minimax_path), kv_cache_memory=1 << 20, max_model_len=512)
    try:
        params = SamplingParams(
            max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5, n=2
        )
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params)
        for index in (0, 1):
            got = []
            for o in outs:
                c = o.outputs[index]
                tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]  # fmt: skip
                got.append((list(c.token_ids), tops))
            assert [t for t, _ in got] == [t for t, _ in hf_ref[:3]]
            check_logprobs_close(hf_ref[:3], got, "transformers", "splitserve")
        assert llm.engine.scheduler.kv.num_snapshot_hits == 3
    finally:
        llm.shutdown()


def test_triton_kernels_in_the_engine_match(minimax_path, monkeypatch):
    """The dispatcher's Triton side (lightning prefill and decode; the interpreter on CPU)
    inside the engine: chunked prefill, decodes and a one-token prompt batched together."""
    from splitserve.kernels import dispatch

    calls: list[str] = []
    real = dispatch._kernel_module

    def kernel_module(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "_kernel_module", kernel_module)
    # NOTE: only the lightning ops: the softmax layer's paged cache has the CPU layout.
    for name in ("lightning_prefill", "lightning_decode"):
        monkeypatch.setattr(dispatch, name, functools.partial(getattr(dispatch, name), backend="triton"))  # fmt: skip
    llm = LLM(
        str(minimax_path), kv_cache_memory=1 << 20, max_model_len=512, max_num_batched_tokens=24
    )
    try:
        prompts = [PROMPTS[0], PROMPTS[3], [PROMPTS[2][0]]]
        ref = hf_greedy_logprobs(hf_model(minimax_path), prompts, 6, 5)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5),
        )
        got = _got(outs)
        assert [t for t, _ in got] == [t for t, _ in ref]
        check_logprobs_close(ref, got, "transformers", "splitserve")
    finally:
        llm.shutdown()
    assert "lightning_attention" in calls
