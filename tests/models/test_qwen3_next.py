"""Qwen3NextForCausalLM (gated delta net layers and a gated full-attention layer, MoE with a
shared expert, a dense MLP layer) in the in-process engine against transformers on the same
tiny random weights (float32, CPU). A running request holds paged KV blocks for the attention
layer and one state slot (conv + recurrent state) for the mixers: prompts of 40-300 tokens run
concurrently, prefill chunks cut through them, a small block budget forces preemption
(recompute of blocks and state alike), a prefix-cache hit restores the mixers' state snapshot
with the attention blocks, and everything comes back when idle."""

from __future__ import annotations

import functools

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.protos import worker_pb2
from splitserve.testing.qwen3_next_model import build_qwen3_next

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 12
LENGTHS = [40, 300, 117, 64]
Kind = worker_pb2.LayerCacheSpec.Kind
MIXER_OPS = (
    "causal_conv1d_prefill",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
)


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def qwen3_next_path(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3-next") / "tiny-qwen3-next"
    # Layer 2 keeps a dense MLP; layers 0 and 1 route through the experts.
    return build_qwen3_next(out, tokenizer_dir=model_factory("llama"), mlp_only_layers=(2,))


@pytest.fixture(scope="module")
def hf_ref(qwen3_next_path):
    return hf_greedy_logprobs(hf_model(qwen3_next_path), PROMPTS, N_TOKENS, 5)


def _got(outs):
    got = []
    for o in outs:
        c = o.outputs[0]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        got.append((list(c.token_ids), tops))
    return got


def _greedy() -> SamplingParams:
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
def test_qwen3_next_matches_transformers(qwen3_next_path, hf_ref, engine_kw):
    llm = LLM(str(qwen3_next_path), kv_cache_memory=1 << 20, max_model_len=512, **engine_kw)
    try:
        specs = llm.engine.executor.runner.describe(16).cache_specs
        assert [s.kind for s in specs] == [
            Kind.KIND_RECURRENT_STATE,
            Kind.KIND_FULL_ATTENTION,
            Kind.KIND_RECURRENT_STATE,
        ]
        # conv state [2 * Hk * Dk + Hv * Dv, K - 1], recurrent state [Hv, Dk, Dv].
        assert list(specs[0].conv_state_shape) == [2 * 2 * 16 + 4 * 16, 3]
        assert list(specs[0].ssm_state_shape) == [4, 16, 16]
        got = _got(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy()))
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


def test_prefix_hit_restores_blocks_and_state(qwen3_next_path, hf_ref):
    """The same prompt twice: the second takes the attention blocks and the mixers' state
    snapshot of the cached prefix together, and still matches."""
    llm = LLM(str(qwen3_next_path), kv_cache_memory=1 << 20, max_model_len=512, block_size=16)
    try:
        for expected_cached in (0, 112):  # 117 tokens: 7 full blocks of 16
            out = llm.generate([{"prompt_token_ids": PROMPTS[2]}], _greedy())
            assert out[0].num_cached_tokens == expected_cached
            got = _got(out)
            assert got[0][0] == hf_ref[2][0]
            check_logprobs_close(hf_ref[2:3], got, "transformers", "splitserve")
    finally:
        llm.shutdown()


def test_zero_centred_norms_load_as_one_plus_weight(qwen3_next_path):
    """The checkpoint's (1 + w) norms hold 1 + w after loading; the mixer's gated norm, which
    scales by w itself, holds w."""
    from safetensors.torch import load_file

    saved = load_file(str(qwen3_next_path / "model.safetensors"))
    llm = LLM(str(qwen3_next_path), kv_cache_memory=1 << 20, max_model_len=512)
    try:
        params = dict(llm.engine.executor.runner.model.named_parameters())
        for name in (
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.self_attn.q_norm.weight",
            "model.norm.weight",
        ):
            torch.testing.assert_close(params[name], saved[name] + 1)
        name = "model.layers.0.linear_attn.norm.weight"
        torch.testing.assert_close(params[name], saved[name])
    finally:
        llm.shutdown()


def test_triton_kernels_in_the_engine_match(qwen3_next_path, monkeypatch):
    """The dispatcher's Triton side of the mixer (conv, chunked rule, recurrent step; the
    interpreter on CPU) inside the engine: chunked prefill, decodes and a fresh one-token prompt batched
    together."""
    from splitserve.kernels import dispatch

    calls: list[str] = []
    real = dispatch._kernel_module

    def kernel_module(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "_kernel_module", kernel_module)
    # The mixer's ops only: the attention layer keeps the torch path's CPU cache layout.
    for op in MIXER_OPS:
        monkeypatch.setattr(
            dispatch, op, functools.partial(getattr(dispatch, op), backend="triton")
        )
    llm = LLM(
        str(qwen3_next_path),
        kv_cache_memory=1 << 20,
        max_model_len=512,
        max_num_batched_tokens=24,
    )
    try:
        prompts = [PROMPTS[0], PROMPTS[3][:45], [PROMPTS[2][0]]]
        ref = hf_greedy_logprobs(hf_model(qwen3_next_path), prompts, 5, 5)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=5),
        )
        got = _got(outs)
        assert [t for t, _ in got] == [t for t, _ in ref]
        check_logprobs_close(ref, got, "transformers", "splitserve")
    finally:
        llm.shutdown()
    assert {"causal_conv1d", "gated_delta"} <= set(calls)


def test_the_mtp_layer_is_read_past_quietly(qwen3_next_path, tmp_path, caplog):
    """Released checkpoints carry a multi-token-prediction layer (`mtp.*`), which serving
    does not use: it loads without a warning per tensor, and other unknown tensors still warn."""
    import shutil

    from safetensors.torch import load_file, save_file

    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.model_loader import load_model

    folder = tmp_path / "with-mtp"
    shutil.copytree(qwen3_next_path, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["mtp.fc.weight"] = torch.zeros(4, 4)
    state["mtp.layers.0.input_layernorm.weight"] = torch.zeros(4)
    state["model.layers.0.unexpected.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level("WARNING", logger="splitserve.worker.model_loader"):
        load_model(WorkerConfig(model=str(folder)))
    assert "mtp." not in caplog.text
    assert "ignoring checkpoint tensor model.layers.0.unexpected.weight" in caplog.text
