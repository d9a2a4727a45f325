"""The OpenAI API end to end with the official client against `splitserve serve`."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import openai
import pytest

from splitserve.testing.demo_model import SPECIAL_TOKENS

from .conftest import wait_for


def _fold_replacements(text: str) -> str:
    return re.sub("\ufffd+", "\ufffd", text)


PROMPTS = ["The Zen of Python says", "Errors should never", "In the face of ambiguity, refuse"]


@pytest.fixture(scope="module")
def hf(tiny_model):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return tok, model


def hf_greedy_text(hf, prompt: str, n: int) -> str:
    import torch

    tok, model = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():  # greedy with EOS ignored, like the server's ignore_eos
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_completions_greedy_match_transformers(client, server, hf):
    for prompt in PROMPTS:
        r = client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == hf_greedy_text(hf, prompt, 16)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 16
        assert r.usage.prompt_tokens == len(hf[0](prompt).input_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 16


def test_completion_batch_prompts_and_token_ids(client, server, hf):
    ids = hf[0](PROMPTS[0]).input_ids
    r = client.completions.create(
        model=server.model,
        prompt=[PROMPTS[1], ids],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == hf_greedy_text(hf, PROMPTS[0], 6)


def test_streaming_equals_non_streaming_and_usage(client, server):
    kw = dict(
        model=server.model,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert not chunks[-1].choices
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


def test_chat_non_streaming_and_streaming(client, server):
    msgs = [{"role": "user", "content": "Say something about namespaces."}]
    r = client.chat.completions.create(
        model=server.model,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content


def test_n_and_seed_determinism(client, server):
    kw = dict(
        model=server.model,
        prompt=PROMPTS[2],
        max_tokens=12,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(n=3, seed=1234, **kw)
    b = client.completions.create(n=3, seed=1234, **kw)
    assert len(a.choices) == 3
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the n sequences differ
    c = client.completions.create(n=3, seed=99, **kw)
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    assert a.usage.completion_tokens == 36


def test_logprobs_completions_and_chat(client, server):
    r = client.completions.create(
        model=server.model,
        prompt=PROMPTS[0],
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    # Keyed by token string: ids that decode alike (partial characters) share a key.
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    for val, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and abs(max(top.values()) - val) < 1e-4  # greedy: chosen is top-1
    # Logprob tokens are decoded one by one with special tokens kept (as vLLM does); the text
    # skips them. Random weights may pick e.g. "<s>", so compare with the specials removed.
    # A character split over several tokens is one U+FFFD per token there but one for the
    # whole broken sequence in the text: compare with runs of U+FFFD folded.
    joined = "".join(t for t in lp.tokens if t not in SPECIAL_TOKENS)
    assert _fold_replacements(joined) == _fold_replacements(r.choices[0].text)
    c = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)


def test_stop_string_truncates_and_reports(client, server):
    def kw(salt: str) -> dict:
        # A fresh cache_salt per call: each prefill runs in full, never partly from blocks an
        # earlier call cached, so the three greedy runs compute the same logits (a cached
        # prefix changes the float rounding, which can flip a near-tie of the random model).
        return dict(
            model=server.model,
            prompt=PROMPTS[1],
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, "cache_salt": f"stop-{salt}-{uuid.uuid4().hex}"},
        )

    full = client.completions.create(**kw("full")).choices[0].text
    stop = full[8:11]
    assert stop.strip(), full
    r = client.completions.create(stop=[stop], **kw("cut"))
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(client.completions.create(stop=[stop], stream=True, **kw("stream")))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_models_and_unserved_endpoint(client, server):
    models = client.models.list()
    assert server.model in [m.id for m in models.data]
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"max_tokens": 5}, 400, "prompt"),
        ({"prompt": "", "max_tokens": 5}, 400, "prompt"),
        ({"prompt": [5, -1], "max_tokens": 5}, 400, "prompt"),
        ({"prompt": [5, 10**6], "max_tokens": 5}, 400, "prompt"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "top_k": -2}, 400, "top_k"),
        ({"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
        ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ({"prompt": "hi", "n": 100000}, 400, "n"),
        ({"prompt": "hi", "stop": ["x"] * 1000}, 400, "stop"),
        ({"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
        ({"prompt": "hi", "max_tokens": 600}, 400, None),
        ({"prompt": "hi", "model": "no-such-model"}, 404, None),
    ],
)
def test_bad_input_statuses(server, body, status, param):
    body = {"model": server.model, **body}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param, err
    if body.get("max_tokens") == 600:
        assert "600" in err["message"] and "512" in err["message"]


@pytest.mark.parametrize(
    "content,ctype",
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"prompt=hi", "text/plain"),
    ],
)
def test_malformed_bodies_are_400(server, content, ctype):
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": ctype})
    assert r.status_code == 400 and "error" in r.json()


def test_overlong_prompt_names_both_numbers(server):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": server.model, "prompt": [5] * 600, "max_tokens": 1},
    )
    assert r.status_code == 400
    assert "600" in r.json()["error"]["message"] and "512" in r.json()["error"]["message"]


def test_chat_bad_messages(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": server.model})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_client_disconnect_mid_stream_frees_blocks(server):
    idle = server.scheduler_stats().num_free_blocks
    assert idle == server.scheduler_stats().num_total_blocks
    body = {
        "model": server.model,
        "prompt": "Beautiful is better than ugly. " * 10,
        "max_tokens": 300,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        seen = 0
        lines = r.iter_lines()  # keep the iterator: dropping it would close the connection
        for line in lines:
            if line.startswith("data: {"):
                json.loads(line[6:])
                seen += 1
                if seen == 3:
                    break
        assert server.scheduler_stats().num_running == 1
    wait_for(
        lambda: (
            server.scheduler_stats().num_free_blocks == idle
            and server.scheduler_stats().num_running == 0
        ),
        30,
        "blocks freed after disconnect",
    )


def test_api_errors_are_openai_exceptions(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_allowed_token_ids_and_bad_words_through_the_stack(client, server, hf):
    """vLLM's allowed_token_ids and bad_words travel gateway -> scheduler -> worker sampler;
    the sampled ids are read back from the logprobs with return_tokens_as_token_ids."""
    tok, _ = hf
    prompt = PROMPTS[0]

    def sampled(**extra) -> list[int]:
        r = client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra},
        )
        tokens = r.choices[0].logprobs.tokens
        assert all(t.startswith("token_id:") for t in tokens), tokens
        return [int(t.split(":")[1]) for t in tokens]

    free = sampled()
    assert tok.decode(free, skip_special_tokens=True) == hf_greedy_text(hf, prompt, 8)
    allowed = [t for t in range(len(tok)) if t not in free][:50]
    got = sampled(allowed_token_ids=allowed)
    assert set(got) <= set(allowed)

    # A word that is one token of the free output, banned: that token no longer appears. A bad
    # word is banned as written and after a space, so either spelling may be the free token.
    def spellings(word: str) -> set[int]:
        ids = [tok(w, add_special_tokens=False).input_ids for w in (word, " " + word)]
        return {i[0] for i in ids if len(i) == 1}

    banned, word = next(
        (t, w) for t in free if (w := tok.decode([t]).strip()) and t in spellings(w)
    )
    assert banned not in sampled(bad_words=[word])
