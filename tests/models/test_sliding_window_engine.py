"""A Mistral checkpoint whose every layer slides over 12 tokens, in the in-process engine with
a block pool far smaller than the requests' contexts: blocks out of the window are released
and reused by other requests while these run, and greedy tokens and logprobs still match
transformers."""

from __future__ import annotations

from splitserve import LLM, SamplingParams
from splitserve.scheduler.sliding_window import SlidingWindowBlockManager

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

PROMPTS = [list(range(20, 61)), [5, 17, 300, 42, 99, 7] * 4, list(range(400, 423))]
N_TOKENS = 40


def test_released_blocks_do_not_change_outputs(mistral_sliding_path):
    ref = hf_greedy_logprobs(hf_model(mistral_sliding_path), PROMPTS, N_TOKENS, 5)
    # 12 blocks of 4 tokens: 48 tokens for three requests that grow to 64-81 tokens each.
    llm = LLM(
        str(mistral_sliding_path),
        block_size=4,
        num_gpu_blocks_override=12,
        max_num_batched_tokens=16,
        kv_cache_memory=8 << 20,
    )
    try:
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
        outs = llm.generate(PROMPTS, params)
        got = []
        for o in outs:
            c = o.outputs[0]
            tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
            got.append((list(c.token_ids), tops))
        assert [t for t, _ in got] == [t for t, _ in ref]
        check_logprobs_close(ref, got, "transformers", "splitserve")
        kv = llm.engine.scheduler.kv
        assert isinstance(kv.blocks, SlidingWindowBlockManager)
        assert kv.blocks.num_released > 20
        assert kv.num_free_blocks == kv.pool.num_blocks
    finally:
        llm.shutdown()
