"""/v1/completions against the fakes: text, n, batches, echo, logprobs, stop, usage, streaming."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from splitserve.gateway.protocol import CompletionResponse, CompletionStreamResponse

from .fakes import BOS, EOS, SCRIPT, script_for

COMPL = "/v1/completions"


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)


def sse_events(text: str) -> list:
    """Parsed `data:` events; the last one must be [DONE]."""
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def tag() -> str:
    return uuid.uuid4().hex[:8]


def test_basic(client):
    r = client.completions.create(model="fake-model", prompt="Hello", max_tokens=7)
    assert r.object == "text_completion" and r.model == "fake-model"
    assert r.choices[0].text == SCRIPT[:7]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6  # BOS + 5 bytes
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == 13


def test_stream_matches_non_stream(client):
    chunks = list(
        client.completions.create(model="fake-model", prompt="Hello", max_tokens=9, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == SCRIPT[:9]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_chunks_match_schema(http):
    r = http.post(
        COMPL,
        json={
            "prompt": "x",
            "max_tokens": 3,
            "stream": True,
            "logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    for event in sse_events(r.text):
        CompletionStreamResponse.model_validate(event)


def test_n_with_seed_differs_and_reproduces(client, fakes):
    t = tag()
    r1 = client.completions.create(
        model="fake-model", prompt=f"seeded {t}", max_tokens=9, n=3, seed=7
    )
    texts = [c.text for c in sorted(r1.choices, key=lambda c: c.index)]
    assert texts == [script_for(7 + i)[:9].decode() for i in range(3)]
    assert len(set(texts)) == 3
    r2 = client.completions.create(
        model="fake-model", prompt=f"seeded {t}", max_tokens=9, n=3, seed=7
    )
    assert [c.text for c in sorted(r2.choices, key=lambda c: c.index)] == texts
    seeds = sorted(c.request.sampling_params.seed for c in fakes.scheduler.calls_matching(t))
    assert seeds == [7, 7, 8, 8, 9, 9]
    assert r1.usage.completion_tokens == 27


def test_batch_prompts_index_is_prompt_times_n_plus_i(http):
    r = http.post(COMPL, json={"prompt": ["A", "B"], "n": 2, "echo": True, "max_tokens": 2})
    body = r.json()
    CompletionResponse.model_validate(body)
    by_index = {c["index"]: c["text"] for c in body["choices"]}
    assert by_index == {0: "ATh", 1: "ATh", 2: "BTh", 3: "BTh"}
    # prompt_tokens_details is null unless --enable-prompt-tokens-details (as vLLM).
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 8,
        "total_tokens": 12,
        "prompt_tokens_details": None,
    }


def test_batch_stream_covers_every_choice(http):
    r = http.post(COMPL, json={"prompt": ["A", "B"], "n": 2, "max_tokens": 3, "stream": True})
    events = sse_events(r.text)
    texts: dict[int, str] = {}
    finished = set()
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finished.add(c["index"])
    assert texts == {i: SCRIPT[:3] for i in range(4)}
    assert finished == {0, 1, 2, 3}


def test_token_id_prompts_and_echo(http):
    r = http.post(
        COMPL, json={"prompt": [[72, 105], [BOS, 79, 107]], "echo": True, "max_tokens": 1}
    )
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == ["HiT", "<s>OkT"]
    assert r.json()["usage"]["prompt_tokens"] == 5


def test_mixed_batch_of_text_and_token_ids(http):
    r = http.post(COMPL, json={"prompt": ["Hi", [79, 107]], "echo": True, "max_tokens": 1})
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == ["HiT", "OkT"]


def test_logprobs_legacy_format(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 4, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(SCRIPT[:4])
    assert lp["token_logprobs"] == [-0.25] * 4
    assert lp["text_offset"] == [0, 1, 2, 3]
    # The chosen token plus the top-k, at most k + 1 entries (vLLM).
    assert lp["top_logprobs"][0] == {"T": -0.25, "U": -1.25}
    assert all(len(t) <= 3 for t in lp["top_logprobs"])


def test_logprobs_zero_gives_chosen_token_only(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 2, "logprobs": 0})
    assert r.json()["choices"][0]["logprobs"]["top_logprobs"] == [{"T": -0.25}, {"h": -0.25}]


def test_echo_with_logprobs_includes_prompt(http):
    r = http.post(COMPL, json={"prompt": "ab", "max_tokens": 2, "logprobs": 1, "echo": True})
    choice = r.json()["choices"][0]
    assert choice["text"] == "abTh"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<s>", "a", "b", "T", "h"]
    assert lp["token_logprobs"] == [None, -1.0, -1.0, -0.25, -0.25]
    assert lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [0, 3, 4, 5, 6]


def test_stream_logprobs_offsets_continue(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 4, "logprobs": 1, "stream": True})
    offsets = [o for e in sse_events(r.text) for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2, 3]


def test_prompt_logprobs(http):
    r = http.post(COMPL, json={"prompt": "ab", "max_tokens": 1, "prompt_logprobs": 1})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 3
    assert plp[1][str(ord("a"))]["logprob"] == -1.0
    assert plp[1][str(ord("a"))]["decoded_token"] == "a"


def test_token_strings_are_cached(http, fakes):
    body = {"prompt": "x", "max_tokens": 6, "logprobs": 3}
    http.post(COMPL, json=body)
    calls_before = len(fakes.tokenizer.decode_each_calls)
    again = http.post(COMPL, json=body)
    assert again.status_code == 200
    assert len(fakes.tokenizer.decode_each_calls) == calls_before


@pytest.mark.parametrize("marker", ["#hold@40", "#multi #hold@40"])
def test_stop_string_finishes_and_cancels_generate(http, fakes, marker):
    t = tag()
    r = http.post(COMPL, json={"prompt": f"{marker} {t}", "max_tokens": 100, "stop": "brown"})
    choice = r.json()["choices"][0]
    assert choice["text"] == "The quick "
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "brown"
    # Counted up to and including the token that completed the stop string.
    assert r.json()["usage"]["completion_tokens"] == len("The quick brown")
    assert fakes.scheduler.waiter.wait_for(
        lambda: [c.cancelled for c in fakes.scheduler.calls_matching(t)] == [True]
    )


def test_stop_string_kept_with_include_stop_str_in_output(http):
    r = http.post(
        COMPL,
        json={
            "prompt": "#hold@40 x",
            "max_tokens": 100,
            "stop": ["fox", "zzz"],
            "include_stop_str_in_output": True,
        },
    )
    assert r.json()["choices"][0]["text"] == "The quick brown fox"


def test_stop_string_streaming(http, fakes):
    t = tag()
    r = http.post(
        COMPL,
        json={
            "prompt": f"#hold@40 {t}",
            "max_tokens": 100,
            "stop": ["lazy"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == "The quick brown fox jumps over the "
    last_choice = [e for e in events if e["choices"]][-1]["choices"][0]
    assert last_choice["finish_reason"] == "stop" and last_choice["stop_reason"] == "lazy"
    assert events[-1]["usage"]["completion_tokens"] == len(
        "The quick brown fox jumps over the lazy"
    )
    assert fakes.scheduler.waiter.wait_for(
        lambda: [c.cancelled for c in fakes.scheduler.calls_matching(t)] == [True]
    )


def test_stop_token_id(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 20, "stop_token_ids": [ord("q")]})
    body = r.json()
    assert body["choices"][0]["text"] == "The "  # the stop token is counted, not shown
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["stop_reason"] == ord("q")
    assert body["usage"]["completion_tokens"] == 5


def test_eos_has_null_stop_reason(http):
    r = http.post(COMPL, json={"prompt": "#eos@3", "max_tokens": 20})
    choice = r.json()["choices"][0]
    assert choice["text"] == "The"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert r.json()["usage"]["completion_tokens"] == 4


def test_eos_in_stop_token_ids_is_reported(http):
    r = http.post(COMPL, json={"prompt": "#eos@2", "max_tokens": 20, "stop_token_ids": [EOS]})
    assert r.json()["choices"][0]["stop_reason"] == EOS


def test_include_usage_final_chunk(http):
    r = http.post(
        COMPL,
        json={
            "prompt": "Hello",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    assert all(e["usage"] is None for e in events[:-1])


def test_continuous_usage_stats(http):
    r = http.post(
        COMPL,
        json={
            "prompt": "Hello",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    events = sse_events(r.text)
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3]


def test_no_usage_chunk_without_include_usage(http):
    r = http.post(COMPL, json={"prompt": "Hello", "max_tokens": 3, "stream": True})
    assert all(e["choices"] and "usage" not in e for e in sse_events(r.text))


def test_sampling_fields_reach_the_scheduler(http, fakes):
    t = tag()
    http.post(
        COMPL,
        json={
            "prompt": t,
            "max_tokens": 3,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "logit_bias": {"65": 200},
            "priority": 3,
            "ignore_eos": True,
            "min_tokens": 1,
            "user": "u",
            "unknown_field": 1,
        },
    )
    (call,) = fakes.scheduler.calls_matching(t)
    sp = call.request.sampling_params
    assert sp.temperature == pytest.approx(0.5) and sp.top_p == pytest.approx(0.9)
    assert sp.top_k == 5 and sp.min_p == pytest.approx(0.1) and sp.ignore_eos
    assert sp.repetition_penalty == pytest.approx(1.2) and sp.min_tokens == 1
    assert dict(sp.logit_bias) == {65: 100.0}  # clamped to [-100, 100]
    assert sp.max_tokens == 3 and call.request.priority == 3


def test_truncate_prompt_tokens(http, fakes):
    t = tag()
    http.post(COMPL, json={"prompt": f"abcdef {t}", "max_tokens": 1, "truncate_prompt_tokens": 8})
    (call,) = fakes.scheduler.calls_matching(t)
    assert len(call.request.prompt_token_ids) == 8


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_over_several_messages(http, stream):
    # Chunked prefill: prompt logprobs arrive in two messages, the first without tokens.
    prompt = "#plpsplit abc"
    r = http.post(
        COMPL,
        json={"prompt": prompt, "max_tokens": 2, "logprobs": 1, "echo": True, "stream": stream},
    )
    if stream:
        events = sse_events(r.text)
        tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
        token_logprobs = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    else:
        lp = r.json()["choices"][0]["logprobs"]
        tokens, token_logprobs = lp["tokens"], lp["token_logprobs"]
    assert tokens == ["<s>", *prompt, "T", "h"]
    assert token_logprobs == [None] + [-1.0] * len(prompt) + [-0.25, -0.25]


def test_adapter_requests_may_use_the_extra_vocabulary(loop_thread, fakes, tmp_path):
    """With --lora-extra-vocab-size, a request naming an adapter may carry token ids up to that
    far past the vocabulary (prompt, stop, logit_bias); without an adapter they are a 400."""
    from .conftest import start_gateway, stop_gateway
    from .fakes import MODEL_VOCAB

    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    gw = start_gateway(
        loop_thread,
        fakes,
        enable_lora=True,
        lora_modules=[f"ad={folder}"],
        lora_extra_vocab_size=4,
    )
    try:
        with gw.client() as c:
            body = {"max_tokens": 1, "stop_token_ids": [MODEL_VOCAB + 1]}
            ok = c.post(COMPL, json={**body, "prompt": [5, MODEL_VOCAB + 3], "model": "ad"})
            assert ok.status_code == 200, ok.text
            far = c.post(COMPL, json={**body, "prompt": [5, MODEL_VOCAB + 4], "model": "ad"})
            assert far.status_code == 400
            assert f"[0, {MODEL_VOCAB + 4})" in far.json()["error"]["message"]
            base = c.post(COMPL, json={"max_tokens": 1, "prompt": [5, MODEL_VOCAB]})
            assert base.status_code == 400
            assert f"[0, {MODEL_VOCAB})" in base.json()["error"]["message"]
        (call,) = [
            c
            for c in fakes.scheduler.calls.values()
            if list(c.request.prompt_token_ids) == [5, MODEL_VOCAB + 3]
        ]
        assert call.request.lora_name == "ad"
        assert list(call.request.sampling_params.stop_token_ids) == [MODEL_VOCAB + 1]
    finally:
        stop_gateway(loop_thread, gw)
