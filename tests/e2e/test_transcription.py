"""`splitserve serve` on a tiny Whisper: OpenAI's `/v1/audio/transcriptions` and
`/v1/audio/translations` through the gateway's multipart form, the tokenizer service's decoding,
log-mel features and chunking, the scheduler and the worker's encoder-decoder, with the official
`openai` client, streamed and not. The text equals transformers' greedy decode of the same audio
on the same weights. Bad input gets a 400 naming the problem, and the server stays healthy."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch

from splitserve.tokenizer_svc.whisper_processor import split
from tests.models.whisper_utils import SAMPLING_RATE, build_whisper, random_audio

from .conftest import Server

N = 16
"""max_completion_tokens of every request (a random model rarely stops by itself)."""


@pytest.fixture(scope="module")
def whisper_server(tiny_model, tmp_path_factory):
    path = build_whisper(tmp_path_factory.mktemp("e2e-whisper") / "tiny-whisper", tiny_model)
    s = Server(
        path,
        ["--max-model-len", "448", "--max-num-seqs", "8", "--max-audio-seconds", "75"],
        tmp_path_factory.mktemp("logs") / "whisper.log",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(whisper_server):
    return openai.OpenAI(
        base_url=whisper_server.url + "/v1", api_key="unused", max_retries=0, timeout=300
    )


def wav(samples: np.ndarray, rate: int = SAMPLING_RATE, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """The samples libsndfile reads from the file (what the server decodes)."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLING_RATE
    return samples


@torch.inference_mode()
def hf_text(path, samples, task="transcribe", language="en", prompt="") -> str:
    """transformers' greedy Whisper decode of each 30 s chunk (split as the server splits),
    N new tokens at most, texts joined."""
    import transformers

    extractor = transformers.WhisperFeatureExtractor.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    head = f"<|startofprev|>{prompt}" if prompt else ""
    text = f"{head}<|startoftranscript|><|{language}|><|{task}|><|notimestamps|>"
    ids = tok.encode(text, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for chunk in split(samples, SAMPLING_RATE, 30.0):
        feats = extractor(chunk, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        seq = model.generate(
            feats, decoder_input_ids=torch.tensor([ids]), max_new_tokens=N, do_sample=False
        )[0].tolist()
        if seq[: len(ids)] == ids:
            seq = seq[len(ids) :]
        if eos in seq:
            seq = seq[: seq.index(eos)]
        out.append(tok.decode(seq, skip_special_tokens=True))
    return "".join(out)


def transcribe(client, server, data: bytes, extra_body: dict | None = None, **kw):
    return client.audio.transcriptions.create(
        model=server.model,
        file=("clip.wav", data, "audio/wav"),
        extra_body={"max_completion_tokens": N, **(extra_body or {})},
        **kw,
    )


def test_transcriptions_match_transformers_concurrently(whisper_server, client):
    clips = [wav(random_audio(i, s)) for i, s in enumerate((1.0, 2.5, 4.0, 0.7))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda d: transcribe(client, whisper_server, d), clips))
    want = [hf_text(whisper_server.model, decoded(d)) for d in clips]
    assert [g.text for g in got] == want
    assert all(want) and len(set(want)) > 1  # real text, and the audio decides it
    assert got[1].usage.seconds == 3  # 2.5 s, rounded up


def test_text_format_language_and_prompt(whisper_server, client):
    data = wav(random_audio(5, 1.5))
    samples = decoded(data)
    text = transcribe(client, whisper_server, data, response_format="text", language="fr")
    assert isinstance(text, str)
    assert text == hf_text(whisper_server.model, samples, language="fr")
    prompted = transcribe(client, whisper_server, data, prompt="earlier words")
    assert prompted.text == hf_text(whisper_server.model, samples, prompt="earlier words")


def test_translation_matches_transformers(whisper_server, client):
    data = wav(random_audio(6, 2.0))
    got = client.audio.translations.create(
        model=whisper_server.model,
        file=("clip.wav", data, "audio/wav"),
        extra_body={"max_completion_tokens": N, "language": "de"},
    )
    want = hf_text(whisper_server.model, decoded(data), "translate", "de")
    assert got.text == want
    assert not hasattr(got, "usage") or got.usage is None  # vLLM: no usage for translations
    # The client's translations.create has no `stream` (OpenAI does not stream translations;
    # vLLM does): the form field goes in extra_body and the events are read raw.
    with client.audio.translations.with_streaming_response.create(
        model=whisper_server.model,
        file=("clip.wav", data, "audio/wav"),
        extra_body={"max_completion_tokens": N, "language": "de", "stream": True},
    ) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert "".join(_delta(e) for e in events) == want
    assert {_field(e, "object") for e in events} == {"translation.chunk"}


def test_sampling_fields_and_stream_usage(whisper_server, client):
    data = wav(random_audio(10, 1.0))
    kw = dict(temperature=1.5, extra_body={"seed": 7, "top_k": 50})
    a, b = (transcribe(client, whisper_server, data, **kw).text for _ in range(2))
    assert a == b  # seeded sampling is reproducible
    assert a != hf_text(whisper_server.model, decoded(data))  # and not greedy
    events = list(
        client.audio.transcriptions.create(
            model=whisper_server.model,
            file=("clip.wav", data, "audio/wav"),
            stream=True,
            extra_body={"max_completion_tokens": N, "stream_include_usage": True},
        )
    )
    usage = _field(events[-1], "usage")
    usage = usage if isinstance(usage, dict) else usage.model_dump()
    assert _field(events[-1], "choices") == []
    assert usage["prompt_tokens"] == 4  # the task tokens
    assert usage["completion_tokens"] == usage["total_tokens"] - 4 > 0


def test_streamed_transcription_matches(whisper_server, client):
    data = wav(random_audio(7, 3.0))
    stream = transcribe(client, whisper_server, data, stream=True)
    events = list(stream)
    text = "".join(_delta(e) for e in events)
    assert text and text == hf_text(whisper_server.model, decoded(data))
    assert len(events) > 1
    assert _field(events[-1], "choices")[0]["finish_reason"] in ("stop", "length")


def _field(event, name):
    return event[name] if isinstance(event, dict) else getattr(event, name)


def _delta(event) -> str:
    choices = _field(event, "choices")
    return choices[0]["delta"]["content"] if choices else ""


def test_long_audio_is_split_into_chunks(whisper_server, client):
    """70 s: three chunks (split at the quietest 100 ms before each 30 s mark, vLLM's way),
    each transcribed, the texts joined; streamed, the chunks come in order."""
    rng = np.random.default_rng(0)
    samples = np.concatenate([random_audio(i, 10.0) for i in range(7)])
    samples[int(29.3 * SAMPLING_RATE) : int(29.5 * SAMPLING_RATE)] = 0.0  # a pause
    samples += 0.01 * rng.standard_normal(samples.size).astype(np.float32)
    data = wav(samples)
    chunks = split(decoded(data), SAMPLING_RATE, 30.0)
    assert len(chunks) == 3
    assert abs(len(chunks[0]) / SAMPLING_RATE - 29.3) < 0.11  # cut in the pause
    want = hf_text(whisper_server.model, decoded(data))
    parts = [hf_text(whisper_server.model, c) for c in chunks]
    assert all(parts) and want == "".join(parts)
    got = transcribe(client, whisper_server, data)
    assert got.text == want
    assert got.usage.seconds == 70
    streamed = transcribe(client, whisper_server, data, stream=True)
    events = list(streamed)
    assert "".join(_delta(e) for e in events) == want
    finishes = [e for e in events if _field(e, "choices")[0].get("finish_reason")]
    assert len(finishes) == 3  # one per chunk


def post(server, data: bytes | None, **fields):
    files = {"file": ("clip.wav", data, "audio/wav")} if data is not None else None
    form = {"model": server.model, **fields}
    return httpx.post(server.url + "/v1/audio/transcriptions", data=form, files=files, timeout=60)


@pytest.mark.parametrize(
    "data, fields, param, match",
    [
        (b"RIFF\x00\x00\x00\x00WAVEjunk", {}, "file", "could not be decoded"),
        (b"plain text, not audio" * 10, {}, "file", "could not be decoded"),
        (None, {}, "file", "file is required"),
        ("long", {}, "file", "more than the 75s allowed"),
        ("ok", {"response_format": "srt"}, "response_format", "not supported"),
        ("ok", {"response_format": "vtt"}, "response_format", "not supported"),
        ("ok", {"response_format": "yaml"}, "response_format", "must be one of"),
        ("ok", {"language": "xx"}, "language", "not supported by this model"),
        ("ok", {"temperature": "-1"}, "temperature", "temperature"),
        ("ok", {"timestamp_granularities[]": "word"}, "timestamp_granularities", "word"),
        ("ok", {"chunking_strategy": "auto"}, "chunking_strategy", "unsupported field"),
        ("ok", {"response_format": "verbose_json", "stream": "true"}, "stream", "streamed"),
        ("ok", {"timestamp_granularities[]": "segment"}, "timestamp_granularities", "needs"),
        ("ok", {"model": "nope"}, "model", "does not exist"),
    ],
)
def test_bad_input_is_a_400_naming_it(whisper_server, data, fields, param, match):
    if data == "ok":
        data = wav(random_audio(8, 0.5))
    elif data == "long":
        data = wav(np.zeros(76 * SAMPLING_RATE, dtype=np.float32))
    r = post(whisper_server, data, **fields)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert match in err["message"]
    assert httpx.get(whisper_server.url + "/health").status_code == 200


@torch.inference_mode()
def hf_timestamped(path, samples, n: int) -> tuple[list[int], int]:
    """transformers' greedy tokens after the timestamped prompt (ending <|0.00|>), EOS and
    what follows cut; and the id of <|0.00|>."""
    import transformers

    extractor = transformers.WhisperFeatureExtractor.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    text = "<|startoftranscript|><|en|><|transcribe|><|0.00|>"
    ids = tok.encode(text, add_special_tokens=False)
    feats = extractor(samples, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    seq = model.generate(
        feats, decoder_input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False
    )[0].tolist()
    seq = seq[len(ids) :] if seq[: len(ids)] == ids else seq
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    return (seq[: seq.index(eos)] if eos in seq else seq), ids[-1]


def test_verbose_json_segments_follow_the_timestamp_tokens(whisper_server, client):
    import transformers

    data = wav(random_audio(9, 1.5))
    n = 120  # long enough for the random model to emit timestamp pairs
    got = client.audio.transcriptions.create(
        model=whisper_server.model,
        file=("clip.wav", data, "audio/wav"),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
        extra_body={"max_completion_tokens": n},
    )
    tokens, base = hf_timestamped(whisper_server.model, decoded(data), n)
    tok = transformers.AutoTokenizer.from_pretrained(whisper_server.model)

    def ts(t):
        return base <= t <= base + 1500

    # Segments by definition: from <|0.00|> (the prompt's last token), each closes at a
    # timestamp followed by another timestamp; a lone trailing timestamp closes the last.
    seq = [base, *tokens]
    if len(seq) >= 2 and ts(seq[-1]) and not ts(seq[-2]):
        seq.append(seq[-1])
    want, opening = [], 0
    for i in range(len(seq) - 1):
        if ts(seq[i]) and ts(seq[i + 1]):
            want.append(seq[opening : i + 1])
            opening = i + 1
    assert len(want) >= 2 and any(len(w) > 2 for w in want), f"nothing to test: {tokens}"
    segments = [s if isinstance(s, dict) else s.model_dump() for s in got.segments]
    assert [s["tokens"] for s in segments] == [w[1:-1] for w in want]
    assert [s["start"] for s in segments] == pytest.approx([0.02 * (w[0] - base) for w in want])
    assert [s["end"] for s in segments] == pytest.approx([0.02 * (w[-1] - base) for w in want])
    texts = [tok.decode(w[1:-1], skip_special_tokens=True) for w in want]
    assert [s["text"] for s in segments] == texts
    assert got.text == "".join(texts)
    assert all(s["avg_logprob"] <= 0 for s in segments)
    assert float(got.duration) == pytest.approx(1.5, abs=1e-3)
    assert got.language == "en"


@pytest.mark.parametrize(
    "path, api", [("transcriptions", "Transcriptions"), ("translations", "Translations")]
)
def test_a_text_model_refuses_speech_to_text(server, path, api):
    r = httpx.post(
        f"{server.url}/v1/audio/{path}",
        data={"model": server.model},
        files={"file": ("clip.wav", wav(random_audio(0, 0.5)), "audio/wav")},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model"
    assert f"does not support the {api} API" in err["message"]


@pytest.mark.parametrize(
    "route, body",
    [
        ("completions", {"prompt": "hello", "max_tokens": 4}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ],
)
def test_text_routes_on_whisper_are_a_400(whisper_server, route, body):
    """Whisper's decoder needs its audio: a text-only request fails alone, with the reason."""
    r = httpx.post(
        f"{whisper_server.url}/v1/{route}",
        json={"model": whisper_server.model, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "takes exactly one audio input per request" in r.json()["error"]["message"]
    assert httpx.get(whisper_server.url + "/health").status_code == 200


def test_disconnects_release_everything(whisper_server, client):
    """CHECKLIST row 17 for speech: more streams than --max-num-seqs (8) are dropped after
    their first event. Each abort must reach the worker and free the request's
    cross-attention slot (a leaked slot would refuse the later requests), and the KV blocks
    come back; then a request is served exactly."""
    from .conftest import wait_for

    data = wav(random_audio(11, 2.0))
    for _ in range(10):
        with client.audio.transcriptions.with_streaming_response.create(
            model=whisper_server.model,
            file=("clip.wav", data, "audio/wav"),
            stream=True,
            extra_body={"max_completion_tokens": 400},
        ) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))

    def idle():
        s = whisper_server.scheduler_stats()
        return s.num_running == 0 and s.num_free_blocks == s.num_total_blocks

    wait_for(idle, 60, "the scheduler to release every block")
    got = transcribe(client, whisper_server, data)
    assert got.text == hf_text(whisper_server.model, decoded(data))


def test_other_rates_channels_and_containers(whisper_server, client):
    """A stereo 44.1 kHz FLAC is mixed down and resampled to 16 kHz (libsoxr) before the
    features: the text is transformers' on those samples."""
    from splitserve.tokenizer_svc import audio

    mono = random_audio(12, 1.2, rate=44100)
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    data = wav(stereo, 44100, "FLAC")
    got = client.audio.transcriptions.create(
        model=whisper_server.model,
        file=("clip.flac", data, "audio/flac"),
        extra_body={"max_completion_tokens": N},
    )
    assert got.text == hf_text(whisper_server.model, audio.load(data, SAMPLING_RATE, "file"))
    assert got.usage.seconds == 2


def test_a_body_past_the_limit_is_a_413(whisper_server):
    big = wav(np.zeros(17 * 1024 * 1024 // 2, dtype=np.float32))  # 16-bit PCM: 17 MiB
    r = post(whisper_server, big)
    assert r.status_code == 413, r.text
    assert httpx.get(whisper_server.url + "/health").status_code == 200
