"""The multipart form of `/v1/audio/transcriptions` and `/v1/audio/translations`.

OpenAI's fields (`file`, `model`, `language`, `prompt`, `response_format`, `temperature`,
`timestamp_granularities[]`, `stream`) and vLLM's extras for them (`top_p`, `top_k`, `min_p`,
`seed`, the penalties, `max_completion_tokens`, `stream_include_usage`,
`stream_continuous_usage_stats`). Every field is parsed and checked here, with a 400 naming
it; a field this server does not act on is refused, never silently dropped.

What vLLM serves is served: `json`, `text` and `verbose_json` (segments with Whisper's
timestamp tokens; not streamed); `srt` and `vtt` are a 400, as in vLLM. `timestamp_granularities`
takes `segment` with `verbose_json` (the segments are what verbose_json returns); `word` needs
word alignment, which this server does not do: a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from starlette.datastructures import FormData, UploadFile

from splitserve.gateway.errors import bad_request

SERVED_FORMATS = ("json", "text", "verbose_json")
OPENAI_FORMATS = (*SERVED_FORMATS, "srt", "vtt")
_FLOATS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty")
_FLOATS_OPT = ("repetition_penalty",)
_INTS = ("top_k", "seed", "max_completion_tokens")
_BOOLS = ("stream", "stream_include_usage", "stream_continuous_usage_stats")
_STRINGS = ("model", "language", "prompt", "response_format")
_GRANULARITIES = ("timestamp_granularities[]", "timestamp_granularities")
_KNOWN = {"file", *_FLOATS, *_FLOATS_OPT, *_INTS, *_BOOLS, *_STRINGS, *_GRANULARITIES}


@dataclass
class TranscriptionForm:
    """One transcription or translation request, checked."""

    file: bytes
    filename: str = ""
    model: str | None = None
    language: str | None = None
    prompt: str = ""
    response_format: str = "json"
    temperature: float = 0.0
    """vLLM's default for these endpoints: greedy unless asked."""
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_include_usage: bool = False
    stream_continuous_usage_stats: bool = False
    timestamp_granularities: list[str] = field(default_factory=list)


async def parse_form(form: FormData, task: str) -> TranscriptionForm:
    """The checked request; a 400 naming the field at fault."""
    unknown = sorted(set(form.keys()) - _KNOWN)
    if unknown:
        raise bad_request(
            f"unsupported field(s) for the {task} endpoint: {', '.join(unknown)}", unknown[0]
        )
    for name in form.keys():
        if name not in _GRANULARITIES and len(form.getlist(name)) > 1:
            raise bad_request(f"{name} is given {len(form.getlist(name))} times", name)
    upload = form.get("file")
    if upload is None:
        raise bad_request("file is required: the audio to transcribe, as a multipart file", "file")
    if not isinstance(upload, UploadFile):
        raise bad_request("file must be an uploaded file (multipart/form-data), not text", "file")
    data = await upload.read()
    if not data:
        raise bad_request("file is empty", "file")
    out = TranscriptionForm(file=data, filename=upload.filename or "")
    for name in _STRINGS:
        value = _text(form, name)
        if value is not None:
            setattr(out, name, value)
    for name in (*_FLOATS, *_FLOATS_OPT):
        value = _text(form, name)
        if value is not None:
            setattr(out, name, _float(name, value))
    for name in _INTS:
        value = _text(form, name)
        if value is not None:
            setattr(out, name, _int(name, value))
    for name in _BOOLS:
        value = _text(form, name)
        if value is not None:
            setattr(out, name, _bool(name, value))
    out.timestamp_granularities = [
        _str_value(name, v) for name in _GRANULARITIES for v in form.getlist(name)
    ]
    _check(out)
    return out


def speech_request_body() -> dict:
    """The OpenAPI request body of the speech-to-text routes (the form is parsed by hand)."""
    number, integer = {"type": "number"}, {"type": "integer"}
    boolean = {"type": "boolean"}
    props: dict = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string"},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(SERVED_FORMATS), "default": "json"},
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"type": "string", "enum": ["segment"]},
        },
        **{name: number for name in (*_FLOATS, *_FLOATS_OPT)},
        **{name: integer for name in _INTS},
        **{name: boolean for name in _BOOLS},
    }
    schema = {"type": "object", "required": ["file"], "properties": props}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _check(out: TranscriptionForm) -> None:
    fmt = out.response_format
    if fmt not in OPENAI_FORMATS:
        raise bad_request(
            f"response_format must be one of {', '.join(OPENAI_FORMATS)}, got {fmt!r}",
            "response_format",
        )
    if fmt not in SERVED_FORMATS:
        raise bad_request(
            f"response_format {fmt!r} is not supported; this server (as vLLM) returns "
            f"{', '.join(SERVED_FORMATS)}",
            "response_format",
        )
    if fmt == "verbose_json" and out.stream:
        raise bad_request("response_format verbose_json cannot be streamed", "stream")
    for g in out.timestamp_granularities:
        if g not in ("word", "segment"):
            raise bad_request(
                f"timestamp_granularities takes 'word' or 'segment', got {g!r}",
                "timestamp_granularities",
            )
        if g == "word":
            raise bad_request(
                "word timestamps are not supported (segment timestamps are, with "
                "response_format verbose_json)",
                "timestamp_granularities",
            )
    if out.timestamp_granularities and fmt != "verbose_json":
        raise bad_request(
            "timestamp_granularities needs response_format verbose_json",
            "timestamp_granularities",
        )
    if (out.stream_include_usage or out.stream_continuous_usage_stats) and not out.stream:
        raise bad_request("stream_include_usage is only allowed with stream", "stream")
    if out.language is not None and not out.language:
        raise bad_request("language must not be empty", "language")


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return None if value is None else _str_value(name, value)


def _str_value(name: str, value) -> str:
    if isinstance(value, UploadFile):
        raise bad_request(f"{name} must be a text field, not a file", name)
    return str(value)


def _float(name: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise bad_request(f"{name} must be a number, got {value!r}", name) from None
    if not math.isfinite(out):
        raise bad_request(f"{name} must be finite", name)
    return out


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {value!r}", name) from None


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad_request(f"{name} must be true or false, got {value!r}", name)
