"""LoRA adapters that add tokens (--lora-extra-vocab-size) against transformers + peft on the
base resized to V + k with the adapter's rows (float32, CPU), in mixed batches with the base
model and an adapter that adds nothing.

The added lm_head rows are made large, so the added tokens win argmaxes: they are sampled
(and then embedded from the adapter's rows), and they appear in the prompts too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve import LLM, SamplingParams
from splitserve.common.lora import LoRARequest

from .lora_utils import make_adapter, peft_greedy
from .lora_vocab_utils import (
    ADDED_TOKEN,
    base_vocab_size,
    make_vocab_adapter,
    peft_vocab_greedy,
    peft_vocab_prompt_logprobs,
    save_adapter_tokenizer,
)

MAX_TOKENS = 10
K = 4
EXTRA = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

# (model, {adapter name: layout}); llama is untied (and padded past its tokenizer), qwen3 tied.
CASES = {
    "llama": {"tti": "tti_dict", "new": "new_embeddings"},
    "qwen3": {"tti": "tti", "mts": "mts"},
}


def _prompts(v: int) -> list[list[int]]:
    return [[11, 57, v + 1, 42, 9], [5, v, 13, v + 3, 88, 7], [400, 401, 402]]


@pytest.fixture(scope="module", params=sorted(CASES))
def setup(request, model_factory, tmp_path_factory):
    base = model_factory(request.param)
    v = base_vocab_size(base)
    root = tmp_path_factory.mktemp(f"vocab_loras_{request.param}")
    prompts = _prompts(v)
    base_prompts = [p for p in prompts if max(p) < v]
    plain = make_adapter(base, root / "plain", ["q_proj", "v_proj"], 4, 8, 3)
    expected = {
        "": peft_greedy(base, None, base_prompts, MAX_TOKENS),
        "plain": peft_greedy(base, plain, base_prompts, MAX_TOKENS),
    }
    for i, (name, layout) in enumerate(CASES[request.param].items()):
        path = make_vocab_adapter(base, root / name, K, layout, seed=10 + i)
        expected[name] = peft_vocab_greedy(base, path, K, prompts, MAX_TOKENS)
    if request.param == "qwen3":  # its vocabulary is its tokenizer's: added tokens follow it
        save_adapter_tokenizer(base, root / "tti", K)
    llm = LLM(
        str(base),
        enable_lora=True,
        lora_root=str(root),
        max_loras=4,
        max_lora_rank=8,
        lora_extra_vocab_size=EXTRA,
    )
    yield llm, root, v, expected
    llm.shutdown()


def test_added_tokens_match_peft_in_a_mixed_batch(setup):
    llm, root, v, expected = setup
    names = [n for n in expected if n not in ("", "plain")]
    for name in names:  # the oracle itself samples added tokens: the test exercises them
        assert any(t >= v for out in expected[name] for t in out), name
    prompts = _prompts(v)
    base_prompts = [p for p in prompts if max(p) < v]
    batch, loras, want = [], [], []
    for i, name in enumerate(names, 1):
        req = LoRARequest(name, i, str(root / name))
        batch += prompts
        loras += [req] * len(prompts)
        want += expected[name]
    plain = LoRARequest("plain", 9, str(root / "plain"))
    for req, key in ((None, ""), (plain, "plain")):
        batch += base_prompts
        loras += [req] * len(base_prompts)
        want += expected[key]
    outs = llm.generate(batch, GREEDY, lora_request=loras)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == want
    # Rows without an adapter that adds tokens never sample one.
    n_added = len(names) * len(prompts)
    assert all(t < v for out in got[n_added:] for t in out)


def test_added_token_ids_need_their_adapter(setup):
    llm, root, v, expected = setup
    name = next(n for n in expected if n not in ("", "plain"))
    # The base model refuses ids past V at the scheduler (no adapter: no extra vocabulary).
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {v}\)"):
        llm.generate([[5, v, 7]], GREEDY)
    # An adapter that adds nothing: the scheduler lets ids up to V + EXTRA through, the
    # worker knows this adapter adds none.
    plain = LoRARequest("plain", 9, str(root / "plain"))
    with pytest.raises(RuntimeError, match=rf"token id {v} is outside the vocabulary \[0, {v}\)"):
        llm.generate([[5, v, 7]], GREEDY, lora_request=plain)
    # The adapter takes its own K added ids, not the rest of --lora-extra-vocab-size.
    req = LoRARequest(name, 1, str(root / name))
    assert llm.generate([[5, v + K - 1, 7]], GREEDY, lora_request=req)[0].outputs[0].token_ids
    with pytest.raises(RuntimeError, match=rf"outside the vocabulary \[0, {v + K}\)"):
        llm.generate([[5, v + K, 7]], GREEDY, lora_request=req)
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {v + EXTRA}\)"):
        llm.generate([[5, v + EXTRA, 7]], GREEDY, lora_request=req)
    # Stop ids may name added tokens of the request's adapter.
    first = expected[name][0]
    stop_at = next(i for i, t in enumerate(first) if t >= v)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[first[stop_at]])
    out = llm.generate([_prompts(v)[0]], sp, lora_request=req)[0].outputs[0]
    assert list(out.token_ids) == first[: stop_at + 1]
    assert out.finish_reason == "stop"


def test_text_prompts_use_the_adapter_tokenizer(setup):
    """Text through the adapter: its tokenizer's added tokens become ids >= V on the way in,
    and sampled added tokens come back as their text; the base model tokenizes the same text
    into base tokens."""
    from transformers import AutoTokenizer

    llm, root, v, _ = setup
    if not (root / "tti" / "tokenizer_config.json").exists():
        pytest.skip("only the qwen3 case ships an adapter tokenizer")
    tok = AutoTokenizer.from_pretrained(str(root / "tti"))
    text = f"hello {ADDED_TOKEN.format(1)} world {ADDED_TOKEN.format(3)}"
    ids = tok.encode(text)
    assert v + 1 in ids and v + 3 in ids
    want = peft_vocab_greedy(Path(llm.worker_config.model), root / "tti", K, [ids], MAX_TOKENS)[0]
    assert any(t >= v for t in want)
    req = LoRARequest("tti", 1, str(root / "tti"))
    out = llm.generate([text], GREEDY, lora_request=req)[0]
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == want
    assert out.outputs[0].text == tok.decode(want, skip_special_tokens=True)
    assert any(ADDED_TOKEN.format(j) in out.outputs[0].text for j in range(K))
    base_out = llm.generate([text], GREEDY)[0]
    assert max(base_out.prompt_token_ids) < v
    # Chat renders with the adapter's tokenizer too: its added tokens stay one id each.
    conv = [{"role": "user", "content": text}]
    chat = llm.chat(conv, GREEDY, lora_request=req)[0]
    assert v + 1 in chat.prompt_token_ids and v + 3 in chat.prompt_token_ids
    assert max(llm.chat(conv, GREEDY)[0].prompt_token_ids) < v


def test_logprobs_cover_the_added_tokens(setup):
    """Prompt logprobs of added prompt tokens and the top logprobs of sampled ones are taken
    over V + k, as transformers + peft give them; the base model's stay within V."""
    import torch

    llm, root, v, expected = setup
    name = next(n for n in expected if n not in ("", "plain"))
    prompt = _prompts(v)[1]  # holds v and v + 3
    want = peft_vocab_prompt_logprobs(Path(llm.worker_config.model), root / name, K, prompt)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    req = LoRARequest(name, 1, str(root / name))
    out = llm.generate([prompt], sp, lora_request=req)[0]
    entries = out.prompt_logprobs
    assert [e.token_id for e in entries] == prompt[1:]
    got = torch.tensor([e.logprob for e in entries])
    targets = torch.tensor(prompt[1:])
    ref = want[:-1].gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    sampled = out.outputs[0].logprobs[0]
    assert sampled.top_token_ids == want[-1].topk(3).indices.tolist()
    base = llm.generate([prompt[:1] + [400, 401]], sp)[0]
    assert all(t < v for e in base.prompt_logprobs for t in e.top_token_ids)


def test_pipeline_ranks_keep_only_their_rows(model_factory, tmp_path):
    """The first rank keeps the added embedding rows, the last the lm_head rows; both know how
    many ids the adapter adds (they bound its requests' token ids alike)."""
    from splitserve.worker.config import WorkerConfig
    from splitserve.worker.lora import LoRAManager
    from splitserve.worker.model_loader import load_model

    base = model_factory("llama")
    v = base_vocab_size(base)
    make_vocab_adapter(base, tmp_path / "ad", K, "mts", seed=7)
    kept = []
    for rank in (0, 1):
        cfg = WorkerConfig(
            model=str(base),
            pipeline_parallel_size=2,
            rank=rank,
            master_port=1,
            enable_lora=True,
            lora_root=str(tmp_path),
            lora_extra_vocab_size=EXTRA,
        )
        loaded = load_model(cfg)
        manager = LoRAManager(cfg, loaded.model, loaded.device, loaded.dtype)
        assert manager.add_request("r", "ad", "ad") is None
        extra = manager.cpu[("ad", 0)].extra
        kept.append((extra.num_tokens, extra.embed is not None, extra.lm_head is not None))
        assert manager.vocab_limit("r") == v + K and manager.vocab_limit("other") == v
        assert manager.logits_width == v + EXTRA
    assert kept == [(K, True, False), (K, False, True)]
