"""`splitserve serve` on a tiny LLaVA: a chat image sent as a data: URL through the gateway,
the tokenizer service's processor, the scheduler and the worker gives transformers' tokens.
Images the server must refuse (too many, remote fetch off) get a 400 naming the part."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import torch

from tests.models.llava_utils import build_llava, random_image, transparent_image

from .conftest import Server

N = 12
QUESTION = "what is in the picture?"


@pytest.fixture(scope="module")
def llava_server(tiny_model, tmp_path_factory):
    path = build_llava(tmp_path_factory.mktemp("e2e-llava") / "tiny-llava", tiny_model)
    s = Server(
        path,
        ["--limit-mm-per-prompt", '{"image": 2}'],
        tmp_path_factory.mktemp("logs") / "llava.log",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llava_client(llava_server):
    return openai.OpenAI(
        base_url=llava_server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(*images_or_urls) -> list[dict]:
    parts = [
        {"type": "image_url", "image_url": {"url": u if isinstance(u, str) else data_url(u)}}
        for u in images_or_urls
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


@torch.inference_mode()
def hf_chat_greedy(path, image) -> tuple[int, list[int]]:
    """(prompt tokens, greedy output tokens) of transformers on the same chat turn: the image
    placeholder, then the text, joined by a newline as the tokenizer service joins parts."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    n = enc["input_ids"].shape[1]
    return n, out[0, n:].tolist()


@pytest.mark.parametrize("transparent", [False, True], ids=["rgb", "rgba"])
def test_chat_with_a_data_url_image_matches_transformers(llava_server, llava_client, transparent):
    # A semi-transparent PNG must be composited onto white, as transformers' processor does.
    image = (
        transparent_image("RGBA", 5, size=(48, 40))
        if transparent
        else random_image(5, size=(48, 40))
    )
    resp = llava_client.chat.completions.create(
        model=llava_server.model,
        messages=messages(image),
        max_tokens=N,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    got = [int(t.token.split(":")[1]) for t in resp.choices[0].logprobs.content]
    num_prompt, want = hf_chat_greedy(llava_server.model, image)
    assert resp.usage.prompt_tokens == num_prompt
    assert got == want
    other = llava_client.chat.completions.create(
        model=llava_server.model,
        messages=messages(random_image(6, size=(48, 40))),
        max_tokens=N,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    assert [int(t.token.split(":")[1]) for t in other.choices[0].logprobs.content] != got
    stream = llava_client.chat.completions.create(
        model=llava_server.model,
        messages=messages(image),
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == num_prompt


@pytest.mark.parametrize(
    "urls, param, match",
    [
        (["IMG", "IMG", "IMG"], "messages", "3 images, more than the limit of 2"),
        (["http://example.com/cat.png"], "messages[0].content[0].image_url", "fetching images"),
        (["file:///etc/passwd"], "messages[0].content[0].image_url", "no --allowed-local"),
        (["data:image/png;base64,AAAA"], "messages", "could not be decoded"),
    ],
)
def test_refused_images_are_400_and_the_server_stays_up(
    llava_server, llava_client, urls, param, match
):
    image = random_image(1)
    urls = [image if u == "IMG" else u for u in urls]
    with pytest.raises(openai.BadRequestError, match=match) as info:
        llava_client.chat.completions.create(
            model=llava_server.model, messages=messages(*urls), max_tokens=2
        )
    assert info.value.body["param"] == param
    ok = llava_client.chat.completions.create(
        model=llava_server.model, messages=messages(image), max_tokens=2
    )
    assert ok.choices[0].finish_reason == "length"
    stats = llava_server.scheduler_stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing held after the requests


def test_a_repeated_image_is_not_encoded_again(llava_server, llava_client):
    """The scheduler's encoder cache through the stack: the same image after other words (so
    the prefix cache cannot serve it) is a cache hit, counted by the scheduler; a new image
    is a miss."""
    image = random_image(11, size=(44, 36))

    def ask(words: str, img) -> None:
        content = [
            {"type": "text", "text": words},
            {"type": "image_url", "image_url": {"url": data_url(img)}},
        ]
        resp = llava_client.chat.completions.create(
            model=llava_server.model,
            messages=[{"role": "user", "content": content}],
            max_tokens=2,
            temperature=0,
        )
        assert resp.usage.completion_tokens == 2

    def counters() -> tuple[int, int]:
        stats = llava_server.scheduler_stats()
        return stats.encoder_cache_queries, stats.encoder_cache_hits

    ask("first look at this", image)
    queries, hits = counters()
    ask("and now, with other words in front, the same", image)
    assert counters() == (queries + 1, hits + 1)
    ask("a new one", random_image(12, size=(44, 36)))
    assert counters() == (queries + 2, hits + 1)
