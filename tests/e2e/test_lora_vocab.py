"""A LoRA adapter that adds tokens, through every process: `splitserve serve --enable-lora
--lora-extra-vocab-size 8`. The adapter folder ships its tokenizer (the added tokens); the
tokenizer service tokenizes and detokenizes that adapter's requests with it, and the text
equals what transformers + peft generate on the resized base, decoded by that tokenizer.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.models.lora_vocab_utils import (
    ADDED_TOKEN,
    make_vocab_adapter,
    peft_vocab_greedy,
    save_adapter_tokenizer,
)

from .conftest import Server

K = 4
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def vocab_setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_root")
    path = make_vocab_adapter(tiny_model, root / "v", K, "tti_dict", seed=5)
    save_adapter_tokenizer(tiny_model, path, K)
    server = Server(
        tiny_model,
        [
            "--enable-lora",
            "--lora-root",
            str(root),
            "--lora-modules",
            f"v={path}",
            "--lora-extra-vocab-size",
            "8",
        ],
        tmp_path_factory.mktemp("vocab_logs") / "serve.log",
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield server, client, path
    server.stop()


def test_adapter_tokenizer_end_to_end(vocab_setup, tiny_model):
    server, client, path = vocab_setup
    tok = AutoTokenizer.from_pretrained(str(path))
    v = len(AutoTokenizer.from_pretrained(str(tiny_model)))
    text = f"hello {ADDED_TOKEN.format(0)} world {ADDED_TOKEN.format(2)}"
    ids = tok.encode(text)
    assert v in ids and v + 2 in ids
    want = peft_vocab_greedy(tiny_model, path, K, [ids], MAX_TOKENS)[0]
    assert any(t >= v for t in want)  # the adapter samples an added token
    for stream in (False, True):
        kwargs = dict(
            model="v",
            prompt=text,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            got = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            out = client.completions.create(**kwargs)
            got = out.choices[0].text
            assert out.usage.prompt_tokens == len(ids)  # the added tokens are one id each
        assert got == tok.decode(want, skip_special_tokens=True), stream
        assert any(ADDED_TOKEN.format(j) in got for j in range(K))
    # The base model tokenizes the same text without the added tokens.
    base = client.completions.create(model=server.model, prompt=text, max_tokens=1, temperature=0)
    assert base.usage.prompt_tokens > len(ids)
    # Logprob token strings come from the adapter's tokenizer (added tokens by name).
    lp = client.completions.create(
        model="v",
        prompt=text,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert lp.choices[0].logprobs.tokens == [tok.decode([t]) for t in want]
    # Chat messages render with the adapter's tokenizer as well.
    msgs = [{"role": "user", "content": text}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    chat_ids = tok.encode(rendered, add_special_tokens=False)
    want_chat = len(chat_ids)
    chat = client.chat.completions.create(
        model="v",
        messages=msgs,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.prompt_tokens == want_chat
    chat_want = peft_vocab_greedy(tiny_model, path, K, [chat_ids], MAX_TOKENS)[0]
    tokens = [c.token for c in chat.choices[0].logprobs.content]
    assert tokens == [tok.decode([t]) for t in chat_want]
    assert any(t >= v for t in chat_want)  # an added token, named by the adapter's tokenizer
    base_chat = client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=1, temperature=0
    )
    assert base_chat.usage.prompt_tokens > want_chat


def test_tokenize_and_detokenize_through_the_adapter(vocab_setup):
    server, _, path = vocab_setup
    tok = AutoTokenizer.from_pretrained(str(path))
    text = f"a {ADDED_TOKEN.format(3)} b"
    ids = tok.encode(text)
    r = httpx.post(
        server.url + "/tokenize",
        json={"model": "v", "prompt": text, "return_token_strs": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ids
    assert ADDED_TOKEN.format(3) in r.json()["token_strs"]
    r = httpx.post(server.url + "/detokenize", json={"model": "v", "tokens": ids}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == tok.decode(ids)
    base = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()
    assert len(base["tokens"]) > len(ids)
