"""The pooling runner against transformers: AutoModel's last hidden state (after the final
norm), pooled (LAST or MEAN) and L2-normalized, on the same tiny random Qwen3 weights, with
chunked prefill forced small and through a prefix-cache hit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve import LLM
from splitserve.offline.llm_embed import PoolingParams

# Lengths straddle the 4-token blocks and the 8-token step budget (several chunks each).
PROMPTS = [
    [5, 17, 300],
    [9, 8, 7, 6, 5, 4, 3, 2, 1],
    list(range(40, 57)),
    [int(x) for x in np.random.default_rng(0).integers(3, 999, size=30)],
]


@pytest.fixture(scope="module")
def qwen3_path(model_factory):
    return model_factory("qwen3")


@pytest.fixture(scope="module")
def hf_model(qwen3_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(qwen3_path, dtype=torch.float32).eval()


def hf_embedding(hf_model, ids: list[int], pooling: str, normalize: bool) -> np.ndarray:
    with torch.no_grad():
        hidden = hf_model(torch.tensor([ids])).last_hidden_state[0]
    vec = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
    if normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return vec.numpy()


def engine(path, **kw) -> LLM:
    defaults = dict(
        runner="pooling", kv_cache_memory=8 << 20, block_size=4, max_num_batched_tokens=8
    )
    return LLM(str(path), **{**defaults, **kw})


def test_last_token_pooling_matches_transformers(qwen3_path, hf_model):
    llm = engine(qwen3_path)
    try:
        outs = llm.embed(PROMPTS, use_tqdm=False)
        assert [o.prompt_token_ids for o in outs] == PROMPTS
        for ids, out in zip(PROMPTS, outs, strict=True):
            got = np.array(out.outputs.embedding)
            assert got.shape == (64,)
            np.testing.assert_allclose(got, hf_embedding(hf_model, ids, "LAST", True), atol=2e-5)
            assert abs(np.linalg.norm(got) - 1) < 1e-5
        # The longest prompt again with a new tail: its leading blocks come from the cache,
        # and the last token (never served from the cache) is pooled as before.
        again = PROMPTS[3][:24] + [11, 12, 13]
        (out,) = llm.embed([again], use_tqdm=False)
        assert out.num_cached_tokens >= 20
        np.testing.assert_allclose(
            out.outputs.embedding, hf_embedding(hf_model, again, "LAST", True), atol=2e-5
        )
        # Every block is back once the requests are done.
        stats = llm.engine.scheduler.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        # A generate call on a pooling model is refused, naming the runner.
        with pytest.raises(ValueError, match="--runner pooling"):
            llm.generate([[1, 2, 3]], use_tqdm=False)
        # dimensions on a model that declares no matryoshka support: refused.
        with pytest.raises(ValueError, match="matryoshka"):
            llm.embed([[1, 2]], PoolingParams(dimensions=8), use_tqdm=False)
        # normalize=False per request: the raw last hidden state.
        (out,) = llm.embed([PROMPTS[1]], PoolingParams(normalize=False), use_tqdm=False)
        np.testing.assert_allclose(
            out.outputs.embedding, hf_embedding(hf_model, PROMPTS[1], "LAST", False), atol=2e-5
        )
        # vLLM's TokensPrompt dict, with a cache salt: the same embedding as the bare ids;
        # multi_modal_data is refused, naming it.
        (out,) = llm.embed(
            [{"prompt_token_ids": PROMPTS[1], "cache_salt": "tenant-a"}], use_tqdm=False
        )
        np.testing.assert_allclose(
            out.outputs.embedding, hf_embedding(hf_model, PROMPTS[1], "LAST", True), atol=2e-5
        )
        with pytest.raises(ValueError, match="multi_modal_data"):
            llm.embed(
                [{"prompt_token_ids": [1, 2], "multi_modal_data": {"image": object()}}],
                use_tqdm=False,
            )
        # truncate_prompt_tokens keeps the last k tokens.
        (out,) = llm.embed([PROMPTS[2]], truncate_prompt_tokens=5, use_tqdm=False)
        assert out.prompt_token_ids == PROMPTS[2][-5:]
        np.testing.assert_allclose(
            out.outputs.embedding, hf_embedding(hf_model, PROMPTS[2][-5:], "LAST", True), atol=2e-5
        )
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pooling, normalize", [("MEAN", False), ("CLS", True)])
def test_mean_and_cls_pooling_from_pooler_config(qwen3_path, hf_model, pooling, normalize):
    llm = engine(qwen3_path, pooler_config={"pooling_type": pooling, "normalize": normalize})
    try:
        outs = llm.embed(PROMPTS, use_tqdm=False)
        for ids, out in zip(PROMPTS, outs, strict=True):
            np.testing.assert_allclose(
                out.outputs.embedding, hf_embedding(hf_model, ids, pooling, normalize), atol=2e-5
            )
        # They need every position: a repeated prompt gets no prefix-cache hit.
        (out,) = llm.embed([PROMPTS[3]], use_tqdm=False)
        assert out.num_cached_tokens == 0
        np.testing.assert_allclose(
            out.outputs.embedding,
            hf_embedding(hf_model, PROMPTS[3], pooling, normalize),
            atol=2e-5,
        )
    finally:
        llm.shutdown()


def test_generate_model_refuses_embed(qwen3_path):
    llm = LLM(str(qwen3_path), kv_cache_memory=4 << 20)
    try:
        with pytest.raises(ValueError, match="runner='pooling'"):
            llm.embed(["hi"], use_tqdm=False)
    finally:
        llm.shutdown()


def test_sentence_transformers_pooling_config(qwen3_path, hf_model, tmp_path):
    """A folder whose modules.json says mean pooling without a Normalize module is pooled so,
    without any flag (vLLM reads the same file)."""
    import json
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(qwen3_path, folder)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True})
    )
    llm = engine(folder)
    try:
        info = llm.engine.model_info.runner_info
        assert (info.runner, info.pooling_type, info.normalize) == ("pooling", "MEAN", False)
        (out,) = llm.embed([PROMPTS[2]], use_tqdm=False)
        np.testing.assert_allclose(
            out.outputs.embedding, hf_embedding(hf_model, PROMPTS[2], "MEAN", False), atol=2e-5
        )
    finally:
        llm.shutdown()


@pytest.mark.parametrize("name", ["qwen3", "mistral"])
def test_bare_decoder_checkpoint_is_an_embedding_model(model_factory, tmp_path, name):
    """A checkpoint saved from AutoModel (Qwen3Model / MistralModel, as e5-mistral ships):
    weight names without "model.", no lm_head; `auto` serves it as a pooling model."""
    import shutil

    from transformers import AutoModel

    src = model_factory(name)
    bare = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    folder = tmp_path / f"{name}-bare"
    bare.save_pretrained(folder)
    for f in src.glob("*token*"):
        shutil.copy(f, folder)
    assert bare.config.architectures[0].endswith("Model")
    llm = LLM(str(folder), kv_cache_memory=8 << 20, block_size=4, max_num_batched_tokens=8)
    try:
        assert llm.engine.model_info.runner_info.runner == "pooling"
        outs = llm.embed(PROMPTS[:3], use_tqdm=False)
        for ids, out in zip(PROMPTS, outs, strict=False):
            np.testing.assert_allclose(
                out.outputs.embedding, hf_embedding(bare, ids, "LAST", True), atol=2e-5
            )
    finally:
        llm.shutdown()


def test_lora_adapter_embeddings_match_peft(model_factory, tmp_path):
    """Embeddings through a LoRA adapter equal transformers + peft's final hidden state; the
    base model's, in the same batch, stay the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from splitserve.common.lora import LoRARequest

    from .lora_utils import make_adapter

    base = model_factory("llama")
    adapter = make_adapter(base, tmp_path / "a", ["q_proj", "v_proj", "down_proj"], 8, 16, 3)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()

    def oracle(model, ids):
        with torch.no_grad():
            last = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        return torch.nn.functional.normalize(last, dim=-1).numpy()

    llm = engine(base, enable_lora=True, lora_root=str(tmp_path), max_lora_rank=8)
    try:
        lora = LoRARequest("a", 1, str(adapter))
        outs = llm.embed(PROMPTS[:2] * 2, lora_request=[lora, lora, None, None], use_tqdm=False)
        for i, out in enumerate(outs):
            model = peft if i < 2 else hf
            np.testing.assert_allclose(
                out.outputs.embedding, oracle(model, PROMPTS[i % 2]), atol=3e-5
            )
        assert not np.allclose(outs[0].outputs.embedding, outs[2].outputs.embedding, atol=1e-3)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_preemption_keeps_embeddings_exact(qwen3_path, hf_model, pooling):
    """A KV cache of 12 blocks (48 tokens) for prompts of 17-30 tokens: requests are preempted
    mid-prefill and recomputed, and every embedding still equals transformers'."""
    per_block = 2 * 2 * 2 * 32 * 4 * 4  # layers x (k, v) x kv heads x head_dim x block x fp32
    llm = engine(
        qwen3_path,
        kv_cache_memory=12 * per_block,
        max_num_batched_tokens=16,
        pooler_config={"pooling_type": pooling},
    )
    try:
        batch = [PROMPTS[2], PROMPTS[3], PROMPTS[3][::-1], PROMPTS[2][::-1]]
        outs = llm.embed(batch, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        for ids, out in zip(batch, outs, strict=True):
            np.testing.assert_allclose(
                out.outputs.embedding, hf_embedding(hf_model, ids, pooling, True), atol=2e-5
            )
    finally:
        llm.shutdown()
