"""`splitserve serve` on a tiny Qwen2-Audio: chat audio sent as OpenAI's `input_audio` (base64)
through the gateway, the tokenizer service's decoding and processor, the scheduler and the
worker gives transformers' tokens. Audio the server must refuse gets a 400 naming the part."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import soundfile
import torch

from tests.models.qwen2_audio_utils import SAMPLING_RATE, build_qwen2_audio, random_audio

from .conftest import Server

N = 10
QUESTION = "what is that sound?"
PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"


@pytest.fixture(scope="module")
def audio_server(tiny_model, tmp_path_factory):
    path = build_qwen2_audio(tmp_path_factory.mktemp("e2e-audio") / "tiny-qwen2-audio", tiny_model)
    s = Server(
        path,
        ["--limit-mm-per-prompt", '{"audio": 2}', "--max-audio-seconds", "1.5"],
        tmp_path_factory.mktemp("logs") / "audio.log",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def audio_client(audio_server):
    return openai.OpenAI(
        base_url=audio_server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def encoded(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def input_audio(data: bytes, fmt: str = "wav") -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt},
    }


def messages(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


@torch.inference_mode()
def hf_chat_greedy(path, samples: np.ndarray) -> tuple[int, list[int]]:
    """(prompt tokens, greedy output tokens) of transformers on the same chat turn: the audio
    placeholder, then the text, joined by a newline as the tokenizer service joins parts."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{PLACEHOLDER}\n{QUESTION}"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = processor(
        text=[prompt],
        audio=[samples],
        sampling_rate=SAMPLING_RATE,
        return_tensors="pt",
        add_special_tokens=False,
    )
    out = model.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    n = enc["input_ids"].shape[1]
    return n, out[0, n:].tolist()


def _tokens(resp) -> list[int]:
    return [int(t.token.split(":")[1]) for t in resp.choices[0].logprobs.content]


def test_chat_with_input_audio_matches_transformers(audio_server, audio_client):
    wav = encoded(random_audio(3, 0.8), SAMPLING_RATE)
    kw = dict(
        model=audio_server.model,
        max_tokens=N,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    resp = audio_client.chat.completions.create(messages=messages(input_audio(wav)), **kw)
    # transformers gets the samples libsndfile reads from the same file (16-bit PCM).
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == SAMPLING_RATE
    num_prompt, want = hf_chat_greedy(audio_server.model, samples)
    assert resp.usage.prompt_tokens == num_prompt
    assert _tokens(resp) == want
    other = encoded(random_audio(4, 0.8), SAMPLING_RATE)
    assert _tokens(
        audio_client.chat.completions.create(messages=messages(input_audio(other)), **kw)
    ) != _tokens(resp)
    # Another rate and container: decoded, resampled to 16 kHz, served.
    flac = encoded(random_audio(3, 0.8), 44100, "FLAC")
    resampled = audio_client.chat.completions.create(
        messages=messages(input_audio(flac, "flac")), **kw
    )
    assert len(_tokens(resampled)) == N


@pytest.mark.parametrize(
    "parts, param, match",
    [
        (["OK", "OK", "OK"], "messages", "3 audio parts, more than the limit of 2"),
        ([b"not audio at all" * 20], "messages", "could not be decoded"),
        ([encoded(random_audio(1, 1.8), SAMPLING_RATE)], "messages", "lasts 1.8s, more than"),
        (
            [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}],
            "messages[0].content[0].input_audio",
            "not valid base64",
        ),
        (
            [{"type": "audio_url", "audio_url": {"url": "http://example.com/a.wav"}}],
            "messages[0].content[0].audio_url",
            "fetching audio over http",
        ),
    ],
)
def test_refused_audio_is_400_and_the_server_stays_up(
    audio_server, audio_client, parts, param, match
):
    ok = encoded(random_audio(1, 0.5), SAMPLING_RATE)
    parts = [
        input_audio(ok) if p == "OK" else input_audio(p) if isinstance(p, bytes) else p
        for p in parts
    ]
    with pytest.raises(openai.BadRequestError, match=match) as info:
        audio_client.chat.completions.create(
            model=audio_server.model, messages=messages(*parts), max_tokens=2
        )
    assert info.value.body["param"] == param
    fine = audio_client.chat.completions.create(
        model=audio_server.model, messages=messages(input_audio(ok)), max_tokens=2
    )
    assert fine.choices[0].finish_reason == "length"


def test_a_model_without_audio_refuses_it(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    wav = encoded(random_audio(0, 0.3), SAMPLING_RATE)
    with pytest.raises(openai.BadRequestError, match="does not take audio"):
        client.chat.completions.create(
            model=server.model, messages=messages(input_audio(wav)), max_tokens=2
        )
