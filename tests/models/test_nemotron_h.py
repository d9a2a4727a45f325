"""NemotronHForCausalLM (blocks of Mamba2, attention without rotation, or a squared-ReLU MLP,
after `layers_block_type`) in the in-process engine against transformers (float32, CPU):
concurrent prompts, prefill chunks cutting them, forced preemption, a prefix-cache hit; a
mixture-of-experts block is refused naming the field."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.testing.mamba2_model import build_nemotron_h
from splitserve.worker.models.nemotron_h import block_types

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

N_TOKENS = 10
LENGTHS = [40, 250, 90, 61]


def _prompts():
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def nemotron_path(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("nemotron_h") / "tiny"
    return build_nemotron_h(out, tokenizer_dir=model_factory("llama"), pattern="M*M-")


def _run(llm, prompts):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    got = []
    for o in outs:
        c = o.outputs[0]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        got.append((list(c.token_ids), tops))
    return outs, got


def test_nemotron_h_matches_transformers(nemotron_path):
    ref = hf_greedy_logprobs(hf_model(nemotron_path), PROMPTS, N_TOKENS, 5)
    llm = LLM(
        str(nemotron_path),
        kv_cache_memory=1 << 20,
        max_model_len=512,
        max_num_batched_tokens=48,
        num_gpu_blocks_override=22,
    )
    try:
        _, got = _run(llm, PROMPTS)
        assert [t for t, _ in got] == [t for t, _ in ref]
        check_logprobs_close(ref, got, "transformers", "splitserve")
        s = llm.engine.scheduler
        assert s.num_preemptions > 0
        outs, again = _run(llm, PROMPTS[1:2])
        assert outs[0].num_cached_tokens > 0
        check_logprobs_close(ref[1:2], again, "transformers", "splitserve")
        assert s.kv.num_free_state_slots == s.kv.num_state_slots
        assert s.kv.num_free_blocks == s.kv.pool.num_blocks
    finally:
        llm.shutdown()


def test_moe_blocks_are_refused_naming_the_field():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"unsupported layers_block_type entries \['moe'\]"):
        block_types(SimpleNamespace(layers_block_type=["linear_attention", "moe"]))
