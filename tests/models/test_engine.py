"""The in-process engine (real scheduler + real worker, no gRPC) against transformers."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams

from .utils import check_logprobs_close, hf_greedy_logprobs, hf_model

PROMPTS = [
    [5, 17, 300, 42, 99, 7],
    list(range(20, 61)),
    [8] * 3,
    list(range(400, 423)),
    [600, 601, 602, 603, 604, 605, 606, 607, 608, 609, 610, 611, 612, 613, 614, 615, 616],
]
N_TOKENS = 24


def engine_logprobs(outs) -> list:
    res = []
    for o in outs:
        c = o.outputs[0]
        tops = [dict(zip(lp.top_token_ids, lp.top_logprobs, strict=True)) for lp in c.logprobs]
        res.append((c.token_ids, tops))
    return res


def greedy(n=N_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=5, **kw)


@pytest.fixture(scope="module")
def hf_ref(llama_path):
    return hf_greedy_logprobs(hf_model(llama_path), PROMPTS, N_TOKENS, 5)


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        {"max_num_batched_tokens": 7},  # chunked prefill in pieces of at most 7 tokens
        {"async_scheduling_depth": 1},
    ],
    ids=["default", "chunked", "sync"],
)
def test_llm_greedy_matches_transformers(llama_path, hf_ref, engine_kw):
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20, **engine_kw)
    outs = llm.generate(PROMPTS, greedy())
    got = engine_logprobs(outs)
    assert [t for t, _ in got] == [t for t, _ in hf_ref]
    check_logprobs_close(hf_ref, got, "transformers", "splitserve")
    llm.shutdown()


def test_qwen2_greedy_matches_transformers(qwen2_path):
    ref = hf_greedy_logprobs(hf_model(qwen2_path), PROMPTS[:3], N_TOKENS, 5)
    llm = LLM(str(qwen2_path), kv_cache_memory=8 << 20)
    got = engine_logprobs(llm.generate(PROMPTS[:3], greedy()))
    assert [t for t, _ in got] == [t for t, _ in ref]
    check_logprobs_close(ref, got, "transformers", "splitserve")
    llm.shutdown()


def test_prefix_cache_hit_gives_same_tokens(llama_path, hf_ref):
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20, block_size=4)
    first = llm.generate([PROMPTS[1]], greedy())
    assert first[0].num_cached_tokens == 0
    again = llm.generate([PROMPTS[1]], greedy())
    assert again[0].num_cached_tokens == 40  # 10 full blocks; the last token is recomputed
    assert again[0].outputs[0].token_ids == hf_ref[1][0]
    stats = llm.engine.scheduler.stats()
    assert stats.prefix_cache_hits >= 40
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.shutdown()


def test_tiny_kv_budget_forces_preemption_and_stays_correct(llama_path, hf_ref):
    # 2 layers x 2 KV heads x 16 dims x 4 bytes x (K, V) = 512 bytes per token per rank.
    llm = LLM(str(llama_path), kv_cache_memory=24 * 4 * 512, block_size=4)
    assert llm.engine.num_blocks == 24
    outs = llm.generate(PROMPTS, greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [t for t, _ in hf_ref]
    assert llm.engine.scheduler.kv.num_free_blocks == 24
    llm.shutdown()


def test_stop_strings_n_seed_and_chat(llama_path):
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20)
    full = llm.generate(["Beautiful is better"], SamplingParams(max_tokens=20, temperature=0))
    text = full[0].outputs[0].text
    stop = text[5:8]
    cut = llm.generate(
        ["Beautiful is better"], SamplingParams(max_tokens=20, temperature=0, stop=[stop])
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert cut.stop_reason == stop

    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = [c.token_ids for c in llm.generate(["Flat is better"], sp)[0].outputs]
    b = [c.token_ids for c in llm.generate(["Flat is better"], sp)[0].outputs]
    assert a == b and len({tuple(x) for x in a}) > 1

    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))
    assert chat[0].prompt.endswith("<|im_start|>assistant\n")
    assert len(chat[0].outputs[0].token_ids) <= 4
    llm.shutdown()


def test_llm_rejects_unknown_options_and_bad_requests(llama_path):
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(str(llama_path), no_such_option=2)
    # vLLM arguments with one supported value: that value is fine, another is refused sharply.
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1, got 2"):
        LLM(str(llama_path), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .*, got 'fp8_inc'"):
        LLM(str(llama_path), tensor_parallel_size=1, kv_cache_dtype="fp8_inc")
    with pytest.raises(ValueError, match="pipeline_parallel_size must be 1, got 2"):
        LLM(str(llama_path), pipeline_parallel_size=2)
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20, max_model_len=64)
    with pytest.raises(ValueError, match="64"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    assert not llm.engine.scheduler.requests
    llm.shutdown()


def test_prompt_dicts_and_cache_salt(llama_path):
    """vLLM's prompt dicts: text or token ids, and cache_salt keeps prefix caches apart."""
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20, block_size=4)
    ids = list(range(5, 25))
    plain = llm.generate([ids], greedy())[0]
    same = llm.generate({"prompt_token_ids": ids}, greedy())[0]
    assert same.outputs[0].token_ids == plain.outputs[0].token_ids
    assert same.num_cached_tokens > 0  # no salt shares the unsalted blocks
    salted = llm.generate({"prompt_token_ids": ids, "cache_salt": "t1"}, greedy())[0]
    assert (
        salted.num_cached_tokens == 0 and salted.outputs[0].token_ids == same.outputs[0].token_ids
    )
    again = llm.generate([{"prompt_token_ids": ids, "cache_salt": "t1"}], greedy())[0]
    assert again.num_cached_tokens > 0
    other = llm.generate({"prompt_token_ids": ids, "cache_salt": "t2"}, greedy())[0]
    assert other.num_cached_tokens == 0
    text = llm.generate({"prompt": "hello there"}, greedy())[0]
    assert text.prompt == "hello there" and text.outputs[0].token_ids
    for bad, match in [
        ({"prompt": "x", "multi_modal_data": {}}, "one key, 'image' or 'audio'"),
        ({"prompt": "x", "multi_modal_data": {"image": []}}, "does not take image inputs"),
        ({"prompt": "x", "multi_modal_data": {"audio": []}}, "does not take audio inputs"),
        ({"prompt": "x", "images": []}, "not supported"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one"),
        ({"prompt": "x", "cache_salt": ""}, "non-empty string"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.generate(bad, greedy())
    llm.shutdown()


def _hf_constrained(model, prompt, n, **kw) -> list[int]:
    import torch

    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        **kw,
    )
    return out[0, len(prompt) :].tolist()


def test_allowed_token_ids_and_bad_words_match_transformers(llama_path, hf_ref):
    """allowed_token_ids against transformers' prefix_allowed_tokens_fn, bad words (given as
    token ids) against its bad_words_ids, on the same weights; greedy."""
    model = hf_model(llama_path)
    prompt, free = PROMPTS[1], hf_ref[1][0]
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20)

    allowed = [t for t in range(100, 700) if t not in free[:4]]
    got = llm.generate([prompt], greedy(allowed_token_ids=allowed))[0].outputs[0].token_ids
    want = _hf_constrained(model, prompt, N_TOKENS, prefix_allowed_tokens_fn=lambda b, i: allowed)
    assert got == want and set(got) <= set(allowed) and got != free

    # Ban free[3] right after free[2], and free[6] everywhere: the output must change there.
    assert prompt[-1] != free[2]  # transformers also matches the prompt; splitserve does not
    words = [[free[2], free[3]], [free[6]]]
    got = llm.generate([prompt], greedy(bad_words_token_ids=words))[0].outputs[0].token_ids
    want = _hf_constrained(model, prompt, N_TOKENS, bad_words_ids=words)
    assert got == want and got[:3] == free[:3] and got[3] != free[3]
    assert free[6] not in got
    llm.shutdown()


def test_llm_tokenizes_bad_words_in_both_spellings(llm):
    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=4, bad_words=["hello", "  world", "hello"])
    filled = llm._tokenize_bad_words(sp)
    expected = []
    for text in ("hello", " hello", "world", " world"):
        ids = tok.encode(text, add_special_tokens=False)
        if ids not in expected:
            expected.append(ids)
    assert filled.bad_words_token_ids == expected
    assert sp.bad_words_token_ids is None  # the caller's params are not changed
    # End to end: the free greedy output's first token, as a one-token bad word, never appears.
    free = llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    first = free[0].outputs[0].token_ids[0]
    word = tok.decode([first])
    assert tok.encode(word.lstrip(), add_special_tokens=False) == [first], word
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, bad_words=[word])
    out = llm.generate(["hello"], sp)[0].outputs[0].token_ids
    assert first not in out
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_generate_and_chat_take_vllms_arguments(llm, llama_path):
    """use_tqdm (True, False or a tqdm-like callable), priority, and LLM.chat's template
    arguments, as vLLM's LLM has them."""
    greedy4 = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    plain = llm.generate([[5, 6, 7], [8, 9]], greedy4, use_tqdm=False)

    class Bar:
        made: list = []

        def __init__(self, total, desc):
            self.total, self.count = total, 0
            Bar.made.append(self)

        def update(self, k):
            self.count += k

        def close(self):
            self.closed = True

    outs = llm.generate([[5, 6, 7], [8, 9]], greedy4, use_tqdm=Bar)
    (bar,) = Bar.made
    assert (bar.total, bar.count, bar.closed) == (2, 2, True)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    with pytest.raises(ValueError, match="priorities"):
        llm.generate([[5, 6, 7]], greedy4, priority=[0, 1])
    # As in vLLM, priorities need the priority policy; fcfs (the default) refuses them.
    with pytest.raises(ValueError, match="scheduling-policy priority"):
        llm.generate([[5, 6, 7]], greedy4, use_tqdm=False, priority=[1])
    ranked = LLM(str(llama_path), kv_cache_memory=8 << 20, scheduling_policy="priority")
    outs = ranked.generate([[5, 6, 7], [8, 9]], greedy4, use_tqdm=False, priority=[1, 0])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    ranked.shutdown()

    conv = [{"role": "user", "content": "hi"}]
    default = llm.chat(conv, greedy4, use_tqdm=False)[0]
    assert default.prompt.endswith("<|im_start|>assistant\n")
    custom = llm.chat(
        conv,
        greedy4,
        use_tqdm=False,
        chat_template="{% for m in messages %}[{{ m.content }}|{{ flavour }}]{% endfor %}",
        chat_template_kwargs={"flavour": "x"},
    )[0]
    assert custom.prompt == "[hi|x]"
    assert llm.get_tokenizer().decode(custom.prompt_token_ids) == "[hi|x]"
    cont = llm.chat(
        [*conv, {"role": "assistant", "content": "Sure"}],
        greedy4,
        use_tqdm=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )[0]
    assert cont.prompt.endswith("Sure")
    with pytest.raises(ValueError, match="chat_template_content_format"):
        llm.chat(conv, greedy4, chat_template_content_format="xml")


def test_stop_token_is_counted_not_shown(llama_path):
    """The output processor the gateway runs: the stop token counts, its text does not, and it
    is the stop_reason (an EOS would not be)."""
    llm = LLM(str(llama_path), kv_cache_memory=8 << 20)
    greedy_ = dict(max_tokens=10, temperature=0, ignore_eos=True)
    full = llm.generate(["Beautiful is better"], SamplingParams(**greedy_))[0].outputs[0]
    stops = [t for t in full.token_ids[3:] if t not in full.token_ids[:3]]
    cut = llm.generate(["Beautiful is better"], SamplingParams(stop_token_ids=stops, **greedy_))[
        0
    ].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == cut.token_ids[-1] in stops
    assert cut.text == llm.get_tokenizer().decode(cut.token_ids[:-1], skip_special_tokens=True)
    llm.shutdown()
