"""`--kv-cache-dtype fp8` in the in-process engine against transformers with the same rounding.

The oracle is transformers on the same weights whose attention sees keys and values the way an
FP8 cache stores them: each layer's key and value states (after RoPE) rounded through
float8_e4m3fn with that layer's scales (`kv_quantize_ref` then `kv_dequantize_ref`, an
attention function registered with transformers' AttentionInterface). Greedy tokens identical
and top-k logprobs within the parity rule, over concurrent prompts of 40-300 tokens, with
prefill chunks cutting through them, prefix-cache hits and preemption; the checkpoint's
k_scale / v_scale tensors are the ones used (saturating scales change the answer, and both
sides agree on the changed answer); and the cache takes a quarter of fp32's bytes per block.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve import LLM, SamplingParams
from splitserve.testing.fp8_kv import register_rounded_kv_attention

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 12
LENGTHS = [40, 300, 117, 64, 203]
FP8 = torch.float8_e4m3fn


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = _prompts(LENGTHS)


def _oracle(path, scales, dtype=FP8):
    model = hf_model(path, attn_implementation=register_rounded_kv_attention(scales, dtype))
    return hf_greedy_logprobs(model, PROMPTS, N_TOKENS, 5)


def _engine_logprobs(outs) -> list:
    res = []
    for o in outs:
        c = o.outputs[0]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        res.append((list(c.token_ids), tops))
    return res


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)


def _check(expected, got):
    assert [t for t, _ in got] == [t for t, _ in expected]
    check_logprobs_close(expected, got, "transformers (fp8 K/V)", "splitserve")


@pytest.fixture(scope="module")
def llama_path(model_factory):
    return model_factory("llama")


def _with_scales(src, out, scales: dict[int, tuple[float, float]], fused: bool = False):
    """A copy of `src` with per-layer k_scale / v_scale tensors (or one kv_scale) added, as
    compressed-tensors' kv_cache_scheme (or older AutoFP8) checkpoints store them."""
    shutil.copytree(src, out)
    state = load_file(out / "model.safetensors")
    for layer, (k, v) in scales.items():
        prefix = f"model.layers.{layer}.self_attn."
        if fused:
            state[prefix + "kv_scale"] = torch.tensor(k)
        else:
            state[prefix + "k_scale"] = torch.tensor([k])
            state[prefix + "v_scale"] = torch.tensor(v)
    save_file(state, out / "model.safetensors")
    return out


def test_fp8_cache_matches_transformers_with_rounded_kv(llama_path):
    llm = LLM(
        str(llama_path), kv_cache_dtype="fp8", max_num_batched_tokens=64, kv_cache_memory=8 << 20
    )
    got = _engine_logprobs(llm.generate(PROMPTS, _greedy()))
    _check(_oracle(llama_path, {}), got)
    # The same prompts again: prefix-cache hits read the FP8 blocks the first run wrote.
    again = _engine_logprobs(llm.generate(PROMPTS, _greedy()))
    assert [t for t, _ in again] == [t for t, _ in got]
    assert llm.engine.scheduler.stats().prefix_cache_hits > 0


def test_checkpoint_scales_are_used(llama_path, tmp_path):
    """Per-layer scales from the checkpoint: saturating ones change the model's answer, and
    splitserve agrees with the oracle that applies exactly those scales."""
    scales = {0: (0.002, 0.001), 1: (0.004, 0.5)}
    folder = _with_scales(llama_path, tmp_path / "scaled", scales)
    expected = _oracle(llama_path, scales)
    assert expected != _oracle(llama_path, {})  # the scales matter for these weights
    llm = LLM(str(folder), kv_cache_dtype="fp8", max_num_batched_tokens=64, kv_cache_memory=8 << 20)
    attn = llm.engine.executor.runner.model.model.layers[1].self_attn.attn
    assert (attn.k_scale, attn.v_scale) == pytest.approx(scales[1])
    _check(expected, _engine_logprobs(llm.generate(PROMPTS, _greedy())))


def test_one_kv_scale_for_both(llama_path, tmp_path):
    folder = _with_scales(llama_path, tmp_path / "fused", {0: (0.003, 0.003)}, fused=True)
    llm = LLM(str(folder), kv_cache_dtype="fp8_e4m3", kv_cache_memory=8 << 20)
    attn = llm.engine.executor.runner.model.model.layers[0].self_attn.attn
    assert (attn.k_scale, attn.v_scale) == pytest.approx((0.003, 0.003))


def test_preemption_with_an_fp8_cache(llama_path):
    """A block budget too small for every prompt at once (40 blocks of 16 tokens at 128 bytes
    a token: 2 layers x 2 KV heads x 16 dims x 1 byte x K and V): requests are preempted and
    recomputed, and the tokens still match."""
    llm = LLM(
        str(llama_path),
        kv_cache_dtype="fp8",
        kv_cache_memory=40 * 16 * 128,
        max_num_batched_tokens=64,
    )
    outs = llm.generate(PROMPTS, _greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    _check(_oracle(llama_path, {}), _engine_logprobs(outs))


def test_e5m2_cache(llama_path):
    llm = LLM(str(llama_path), kv_cache_dtype="fp8_e5m2", kv_cache_memory=8 << 20)
    _check(
        _oracle(llama_path, {}, torch.float8_e5m2),
        _engine_logprobs(llm.generate(PROMPTS, _greedy())),
    )


def test_cache_holds_four_times_the_blocks_of_fp32(llama_path):
    budget = 4 << 20
    plain = LLM(str(llama_path), kv_cache_memory=budget)
    fp8 = LLM(str(llama_path), kv_cache_dtype="fp8", kv_cache_memory=budget)
    blocks = [llm.engine.num_blocks for llm in (plain, fp8)]
    assert blocks[1] == 4 * blocks[0]
    key_cache, _ = fp8.engine.executor.runner.model.model.layers[0].self_attn.attn.kv_cache
    assert key_cache.dtype == FP8


def test_bad_scale_is_named(llama_path, tmp_path):
    folder = _with_scales(llama_path, tmp_path / "bad", {1: (0.0, 0.1)})
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.self_attn\.k_scale: a KV cache scale must be positive"
    ):
        LLM(str(folder), kv_cache_dtype="fp8", kv_cache_memory=8 << 20)
    # Without an FP8 cache the scales are not used, so not checked either.
    LLM(str(folder), kv_cache_memory=8 << 20)
    shape = _with_scales(llama_path, tmp_path / "shape", {})
    state = load_file(shape / "model.safetensors")
    state["model.layers.0.self_attn.v_scale"] = torch.ones(2)
    save_file(state, shape / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"v_scale: a KV cache scale holds one value, got shape \(2,\)"
    ):
        LLM(str(shape), kv_cache_memory=8 << 20)
