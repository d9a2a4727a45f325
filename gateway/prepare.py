"""A request's one tokenizer-service call before generation (`TokenizerService.Prepare`).

Every endpoint that sends prompts to the engine (chat, completions, embeddings, /tokenize with
messages) builds one `PrepareRequest` here: chat messages (images fetched first) or prompts,
bad words, the structured-output constraint, truncation. One call answers all of it, so a
request pays one round trip before the scheduler sees it, and the constraint's compiled form
comes back to travel with the request (`GenerateRequest.compiled_grammar`): nothing after the
gateway asks the tokenizer service again.

A refused call names the part at fault in its trailing metadata; it becomes the 400 each part
always gave: `invalid <constraint>: ...` for a constraint, the renderer's message (with the
field it names) for chat messages.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from splitserve.common.mm_limits import parse_mm_limits
from splitserve.common.sampling_params import SamplingParams
from splitserve.gateway.clients import TOKENIZER_SERVICE
from splitserve.gateway.errors import RequestError, bad_request, param_from_details
from splitserve.gateway.generation import Deadline
from splitserve.gateway.media import MediaPolicy, audio_policy, decode_base64, load_image
from splitserve.gateway.protocol import ChatMessage
from splitserve.gateway.structured import Constraint
from splitserve.protos import tokenizer_pb2
from splitserve.tokenizer_svc.prepare import PART_GRAMMAR, PART_METADATA_KEY, PART_PROMPT

_MAX_TOTAL_IMAGE_BYTES = 48 << 20
"""The images (or audio) of one request travel to the tokenizer service in one gRPC message
(64 MiB)."""


async def prepare(
    clients,
    request: tokenizer_pb2.PrepareRequest,
    deadline: Deadline,
    *,
    sampling: SamplingParams | None = None,
    constraint: Constraint | None = None,
    prompt_param: str = "prompt",
) -> tokenizer_pb2.PrepareResponse:
    """Send `request` with the bad words of `sampling` and `constraint` added; fills
    sampling.bad_words_token_ids. Refusals become the 400s described above."""
    check_prompt_size(clients, request, prompt_param)
    words = sampling.bad_words if sampling is not None else None
    if words:
        request.bad_words.extend(words)
    if constraint is not None:
        request.grammar.CopyFrom(constraint.grammar)
    try:
        response = await clients.tokenizer.Prepare(request, timeout=clients.call_timeout(deadline))
    except grpc.aio.AioRpcError as exc:
        refusal = _refusal(exc, request, constraint, deadline)
        if refusal is None:
            refusal = clients.stalled_error(exc, deadline, TOKENIZER_SERVICE)
            if refusal is exc:
                raise
        raise refusal from None
    if words:
        sampling.bad_words_token_ids = [list(s.token_ids) for s in response.bad_words_token_ids]
    return response


def prompt_char_limit(clients) -> int | None:
    """The most characters a prompt may hold: what max_model_len tokens can stand for (the
    tokenizer service's max_token_chars each); None when the service does not say."""
    info = clients.tokenizer_info
    per_token = info.max_token_chars if info is not None else 0
    ctx = clients.max_model_len
    return ctx * per_token if per_token > 0 and ctx > 0 else None


def check_prompt_chars(clients, chars: int, what: str, param: str) -> None:
    """A 400 for a text too long to fit the context in any tokenization, sent before the
    tokenizer service spends time and memory on it (a prompt past the context would be
    refused after tokenizing anyway)."""
    limit = prompt_char_limit(clients)
    if limit is not None and chars > limit:
        raise bad_request(
            f"{what} holds {chars} characters, more than any prompt that fits this model's "
            f"maximum context length of {clients.max_model_len} tokens can hold ({limit}: at "
            f"most {limit // clients.max_model_len} characters a token). Please reduce the "
            "length of the prompt.",
            param,
        )


def check_prompt_size(
    clients, request: tokenizer_pb2.PrepareRequest, prompt_param: str = "prompt"
) -> None:
    """Every text of a Prepare request against prompt_char_limit: each prompt, or the chat
    messages as JSON with their tools and documents (what the template renders from). A
    request that asks for truncation may be longer: only the body limit bounds it."""
    if request.HasField("truncate_prompt_tokens"):
        return
    if request.HasField("chat"):
        chat = request.chat
        chars = len(chat.messages_json) + len(chat.tools_json) + len(chat.documents_json)
        check_prompt_chars(clients, chars, "the messages (as JSON, with tools)", "messages")
    for k, p in enumerate(request.prompts.prompts):
        if p.WhichOneof("kind") == "text":
            check_prompt_chars(clients, len(p.text), f"{prompt_param} {k}", prompt_param)


def _refusal(
    exc: grpc.aio.AioRpcError,
    request: tokenizer_pb2.PrepareRequest,
    constraint: Constraint | None,
    deadline: Deadline,
) -> RequestError | None:
    """The 400 for a refused part, or None to pass the gRPC error on as it is."""
    part = dict(exc.trailing_metadata() or ()).get(PART_METADATA_KEY)
    code = exc.code()
    details = exc.details() or code.name
    if part == PART_GRAMMAR and constraint is not None:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(f"invalid {constraint.label}: {details}", constraint.param)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not deadline.expired():
            return RequestError(
                400, f"{constraint.label} took too long to compile: {details}", constraint.param
            )
    if part == PART_PROMPT and request.HasField("transcription"):
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(details, _transcription_param(details))
    if part == PART_PROMPT and request.HasField("chat"):
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            param = param_from_details(details)
            if param is None:
                has_template = request.chat.HasField("chat_template")
                param = "chat_template" if has_template else "messages"
            return bad_request(details, param)
    return None


def _transcription_param(details: str) -> str:
    """The form field a refused transcription names: the audio unless the message says."""
    for param in ("language", "response_format", "model"):
        if param in details or (param == "response_format" and "timestamp" in details):
            return param
    return "prompt" if "<|startofprev|>" in details else "file"


def prompt_list(items: list[Any], add_special_tokens: bool) -> tokenizer_pb2.PromptList:
    """Completion or embedding prompts (each text or a list of token ids), in order."""
    out = tokenizer_pb2.PromptList(add_special_tokens=add_special_tokens)
    for item in items:
        if isinstance(item, str):
            out.prompts.add(text=item)
        else:
            out.prompts.add(token_ids=tokenizer_pb2.TokenIds(token_ids=item))
    return out


# ----------------------------------------------------------------------------- chat input


async def chat_input(
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    config=None,
    documents: list[dict[str, str]] | None = None,
) -> tokenizer_pb2.ChatInput:
    """The messages and template options for Prepare; with `config` (the gateway's),
    image_url parts are fetched under its media rules and sent along (refused without it)."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    rendered_json, image_urls, audio_parts = messages_json(messages)
    chat = tokenizer_pb2.ChatInput(
        messages_json=rendered_json,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )
    if image_urls:
        chat.images.extend(await _load_images(image_urls, config))
    if audio_parts:
        chat.audio.extend(await _load_audio(audio_parts, config))
    if chat_template is not None:
        chat.chat_template = chat_template
    if chat_template_kwargs:
        chat.chat_template_kwargs_json = json.dumps(chat_template_kwargs)
    if tools:
        chat.tools_json = json.dumps(tools)
    if documents is not None:
        chat.documents_json = json.dumps(documents)
    return chat


def messages_json(
    messages: list[ChatMessage],
) -> tuple[str, list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The messages as the tokenizer service takes them: text parts joined into one string,
    or, with images or audio, a list of text parts and `{"type": "image"}` / `{"type":
    "audio"}` placeholders; the (url, param) of every image_url part, in order; and the
    (kind, value, param) of every audio part, in order: ("data", base64) for OpenAI's
    `input_audio`, ("url", url) for vLLM's `audio_url`."""
    out = []
    images: list[tuple[str, str]] = []
    audio: list[tuple[str, str, str]] = []
    for k, message in enumerate(messages):
        m = message.model_dump(exclude_unset=True)
        content = message.content
        if isinstance(content, list):
            parts: list[dict] = []
            for j, part in enumerate(content):
                if part.type == "image_url":
                    param = f"messages[{k}].content[{j}].image_url"
                    images.append((_image_url(part, param), param))
                    parts.append({"type": "image"})
                elif part.type in ("input_audio", "audio_url"):
                    param = f"messages[{k}].content[{j}].{part.type}"
                    audio.append((*_audio_source(part, param), param))
                    parts.append({"type": "audio"})
                elif part.type == "text" and part.text is not None:
                    parts.append({"type": "text", "text": part.text})
                else:
                    raise bad_request(
                        f"messages[{k}]: content part type '{part.type}' is not "
                        f"supported (only text, image_url, input_audio and audio_url)",
                        "messages",
                    )
            if any(p["type"] != "text" for p in parts):
                m["content"] = parts
            else:
                m["content"] = "\n".join(p["text"] for p in parts)
        out.append(m)
    return json.dumps(out), images, audio


_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


def _audio_source(part, param: str) -> tuple[str, str]:
    """("data", base64) of an `input_audio` part, ("url", url) of an `audio_url` part."""
    value = (part.model_extra or {}).get(part.type)
    if part.type == "audio_url":
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}.url must be a non-empty string", param)
        return "url", url
    if not isinstance(value, dict) or not isinstance(value.get("data"), str) or not value["data"]:
        raise bad_request(f"{param}.data must be a non-empty base64 string", param)
    fmt = value.get("format")
    if fmt is not None and fmt not in _AUDIO_FORMATS:
        raise bad_request(
            f"{param}.format must be one of {', '.join(_AUDIO_FORMATS)}, got {fmt!r}", param
        )
    return "data", value["data"]


async def _load_audio(parts: list[tuple[str, str, str]], config) -> list[bytes]:
    """Read every audio part (data decoded, URLs fetched under the media rules), after checking
    their number against the limit. Decoding and length limits are the tokenizer service's."""
    _check_count(config, "audio", len(parts), "audio parts", parts[0][2])
    policy = audio_policy(MediaPolicy.from_config(config))

    async def load(kind: str, value: str, param: str) -> bytes:
        if kind == "url":
            return await load_image(value, policy, param)
        return decode_base64(value, policy, param)

    return _check_total(list(await asyncio.gather(*(load(*part) for part in parts))), "audio")


def _image_url(part, param: str) -> str:
    value = (part.model_extra or {}).get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}.url must be a non-empty string", param)
    return url


async def _load_images(urls: list[tuple[str, str]], config) -> list[bytes]:
    """Fetch every image (concurrently), after checking their number against the limit."""
    _check_count(config, "image", len(urls), "images", urls[0][1], "image_url parts")
    policy = MediaPolicy.from_config(config)
    blobs = list(await asyncio.gather(*(load_image(url, policy, p) for url, p in urls)))
    return _check_total(blobs, "images")


def _check_count(config, modality: str, n: int, what: str, param: str, parts: str = "") -> None:
    """400 unless this endpoint takes `modality` parts and `n` is within its limit."""
    if config is None:
        raise bad_request(f"{parts or what} are not accepted on this endpoint", param)
    limit = parse_mm_limits(config.limit_mm_per_prompt)[modality]
    if n > limit:
        raise bad_request(
            f"the messages carry {n} {what}, more than the limit of {limit} "
            "(--limit-mm-per-prompt)",
            "messages",
        )


def _check_total(blobs: list[bytes], what: str) -> list[bytes]:
    """`blobs`, unless together they exceed what one message to the tokenizer service holds."""
    total = sum(len(b) for b in blobs)
    if total > _MAX_TOTAL_IMAGE_BYTES:
        raise bad_request(
            f"the messages' {what} hold {total} bytes together, more than "
            f"{_MAX_TOTAL_IMAGE_BYTES} per request",
            "messages",
        )
    return blobs
