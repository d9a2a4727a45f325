"""Chat templates: OpenAI messages in, the rendered prompt and its token ids out.

Rendering goes through `tokenizer.apply_chat_template(..., tokenize=False)` (transformers'
sandboxed Jinja environment); the text is then tokenized with `add_special_tokens=False`, as
vLLM does for chat: a template that wants BOS writes it, and it is never added twice.

Render time is bounded. A template is code; one that loops for hours would hold a worker
thread (and grow memory) long after the request gave up. The render runs under a trace
function that raises once the deadline passes, at the next line the compiled template
executes or the next Python call, so the thread itself stops, not only the wait for it.
Limit: a single C-level operation that runs long (a huge string repeat) is not interrupted;
request templates are refused unless the operator trusts them.

Content format (vLLM's `--chat-template-content-format`): "string" hands the template each
message's content as one string, text parts joined by '\n'; "openai" hands it a list of parts
(`{"type": "text", "text": ...}`, `{"type": "image"}`), which templates that loop over
`message['content']` need (llava-hf's do). "auto" picks "openai" for such a template.

Images: for a model with an image processor, an `{"type": "image"}` content part (the gateway
has fetched the image and sends its bytes beside the messages) becomes, in the string format,
the model's image placeholder text (LLaVA's `<image>`) at its place among the text parts; in
the openai format the template writes the placeholder. The processor later expands it
(tokenizer_svc/multimodal.py). Audio likewise, for a model with an audio processor: an
`{"type": "audio"}` part becomes its placeholder (Qwen2-Audio's
`<|audio_bos|><|AUDIO|><|audio_eos|>`; tokenizer_svc/audio_processor.py). `image_url`,
`input_audio` and `audio_url` parts must be resolved by the caller first; video and file parts
are refused.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field

from .errors import InvalidRequest
from .tokenizer import TokenizerHandle, check_text

logger = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MEDIA_PARTS = {
    "image_url": "images",
    "image": "images",
    "input_image": "images",
    "image_pil": "images",
    "image_embeds": "images",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio": "audio",
    "video_url": "video",
    "video": "video",
    "file": "files",
}
# apply_chat_template arguments a request's chat_template_kwargs may not override.
_RESERVED_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
    }
)
# Compiled Jinja templates carry this file name; only their lines are traced.
_TEMPLATE_FILENAME = "<template>"
CONTENT_FORMATS = ("auto", "string", "openai")
# A template that loops over a message's content: `for x in message['content']` / `.content`.
_CONTENT_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+\s*(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")


def detect_content_format(template: str | None) -> str:
    """ "openai" for a template that loops over message content parts, else "string"."""
    return "openai" if template and _CONTENT_LOOP.search(template) else "string"


@dataclass(slots=True)
class ChatRequest:
    """A validated chat input (Prepare's ChatInput)."""

    messages: list[dict]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    tools: list[dict] | None = None
    kwargs: dict = field(default_factory=dict)
    num_images: int = 0
    """`{"type": "image"}` parts in the messages (each is an image placeholder in the text)."""
    documents: list[dict] | None = None
    """vLLM's `documents`, for RAG templates."""
    num_audio: int = 0
    """`{"type": "audio"}` parts in the messages (each is an audio placeholder in the text)."""


@dataclass(slots=True)
class _Media:
    """The placeholder text of each modality the model takes, and the parts found, in order."""

    placeholders: dict[str, str]
    found: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RenderedChat:
    """The rendered prompt and its token ids."""

    prompt: str
    token_ids: list[int]


def parse_chat_request(
    messages_json: str,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    tools_json: str | None = None,
    chat_template_kwargs_json: str | None = None,
    image_placeholder: str | None = None,
    content_format: str = "string",
    documents_json: str | None = None,
    audio_placeholder: str | None = None,
) -> ChatRequest:
    """Validate a ChatInput's JSON fields; InvalidRequest says what's wrong.
    `image_placeholder` (the model's image token text; None when it takes no images) stands in
    for each `{"type": "image"}` part, `audio_placeholder` for each `{"type": "audio"}` part;
    `content_format` is "string" or "openai" (see above)."""
    if add_generation_prompt and continue_final_message:
        raise InvalidRequest(
            "add_generation_prompt and continue_final_message cannot both be set: the first "
            "opens a new assistant turn, the second continues the last message"
        )
    messages = _load_json(messages_json, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty JSON array of message objects")
    placeholders = {"image": image_placeholder, "audio": audio_placeholder}
    media = _Media({k: v for k, v in placeholders.items() if v is not None})
    parsed = [
        _parse_message(m, i, media, content_format == "openai") for i, m in enumerate(messages)
    ]
    if continue_final_message and parsed[-1]["role"] != "assistant":
        raise InvalidRequest(
            f"continue_final_message needs an assistant message last, got role "
            f"{parsed[-1]['role']!r}"
        )
    tools = None
    if tools_json is not None:
        tools = _load_json(tools_json, "tools")
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise InvalidRequest("tools must be a JSON array of objects")
    kwargs: dict = {}
    if chat_template_kwargs_json is not None:
        kwargs = _load_json(chat_template_kwargs_json, "chat_template_kwargs")
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be a JSON object")
        reserved = sorted(_RESERVED_KWARGS.intersection(kwargs))
        if reserved:
            raise InvalidRequest(
                f"chat_template_kwargs may not set {', '.join(reserved)}: "
                "use the request fields instead"
            )
    documents = None
    if documents_json is not None:
        documents = _load_json(documents_json, "documents")
        if not isinstance(documents, list) or not all(
            isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in documents
        ):
            raise InvalidRequest("documents must be a JSON array of objects with string values")
    return ChatRequest(
        parsed,
        add_generation_prompt,
        continue_final_message,
        chat_template,
        tools,
        kwargs,
        media.found.count("image"),
        documents,
        media.found.count("audio"),
    )


def _load_json(text: str, what: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None


def _parse_message(message, i: int, media: _Media, as_parts: bool = False) -> dict:
    if not isinstance(message, dict):
        raise InvalidRequest(f"messages[{i}] must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    out = dict(message)
    if as_parts:
        out["content"] = _content_parts(message.get("content"), role, i, media)
    else:
        out["content"] = _content_text(message.get("content"), role, i, media)
    tool_calls = out.get("tool_calls")
    if tool_calls is not None:
        out["tool_calls"] = _parse_tool_calls(tool_calls, i)
    return out


def _content_text(content, role: str, i: int, media: _Media | None = None) -> str:
    """OpenAI content (a string or a list of parts) as one string, text parts (and image or
    audio placeholders) joined by '\\n'; every media part found is noted in `media`."""
    if content is None or isinstance(content, str):
        return _plain_content(content, role, i)
    parts = _content_parts(content, role, i, media)
    return "\n".join(
        p["text"] if p["type"] == "text" else media.placeholders[p["type"]] for p in parts
    )


def _plain_content(content: str | None, role: str, i: int) -> str:
    if content is None:
        if role == "assistant":  # tool calls only, or an empty prefill
            return ""
        raise InvalidRequest(f"messages[{i}].content is required for role {role!r}")
    return content


def _content_parts(content, role: str, i: int, media: _Media | None) -> list[dict] | str:
    """OpenAI content as a list of `{"type": "text", "text"}`, `{"type": "image"}` and
    `{"type": "audio"}` parts (the "openai" content format); a missing assistant content
    stays ""."""
    takes = media.placeholders if media is not None else {}
    if content is None or isinstance(content, str):
        text = _plain_content(content, role, i)
        return [{"type": "text", "text": text}] if content is not None else text
    if not isinstance(content, list):
        raise InvalidRequest(
            f"messages[{i}].content must be a string or an array of content parts, "
            f"got {type(content).__name__}"
        )
    parts: list[dict] = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{where} must be an object, got {type(part).__name__}")
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}.{kind} must be a string")
            parts.append({"type": "text", "text": text})
        elif kind in ("image", "audio") and kind in takes:
            parts.append({"type": kind})
            media.found.append(kind)
        elif kind in ("image_url", "input_image") and "image" in takes:
            raise InvalidRequest(
                f"{where}: {kind!r} parts are fetched by the gateway; send {{'type': 'image'}} "
                "parts with the image files in ChatInput.images"
            )
        elif kind in ("input_audio", "audio_url") and "audio" in takes:
            raise InvalidRequest(
                f"{where}: {kind!r} parts are read by the gateway; send {{'type': 'audio'}} "
                "parts with the audio files in ChatInput.audio"
            )
        elif kind in _MEDIA_PARTS:
            raise InvalidRequest(
                f"{where}: {_MEDIA_PARTS[kind]} are not supported by this model for now "
                f"(content part type {kind!r})"
            )
        else:
            raise InvalidRequest(f"{where}.type {kind!r} is not a known content part type")
    return parts


def _parse_tool_calls(tool_calls, i: int) -> list:
    if not isinstance(tool_calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be an array")
    out = []
    for call in tool_calls:
        call = dict(call) if isinstance(call, dict) else call
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            # OpenAI sends arguments as a JSON string; templates index them as a dict (vLLM too).
            try:
                args = json.loads(fn["arguments"])
            except (json.JSONDecodeError, RecursionError):
                args = None
            if isinstance(args, dict):
                call["function"] = {**fn, "arguments": args}
        out.append(call)
    return out


class _RenderDeadline(BaseException):
    """Raised by the trace function. NOTE: a BaseException, so that no `except Exception` in
    Jinja or transformers swallows it (the tracer is gone once it has fired)."""


class ChatRenderer:
    """Renders chat requests with a bounded time; call `render` from a worker thread."""

    def __init__(
        self,
        handle: TokenizerHandle,
        trust_request_chat_template: bool = False,
        timeout_s: float = 5.0,
        content_format: str = "auto",
    ):
        self._handle = handle
        self._trust_request_template = trust_request_chat_template
        self._timeout_s = timeout_s
        self._content_format = content_format

    def content_format(self, request_template: str | None = None) -> str:
        """ "string" or "openai" for a request (its own template, if any, else the server's)."""
        if self._content_format != "auto":
            return self._content_format
        template = request_template or self._handle.chat_template
        if template is None:
            template = getattr(self._handle.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one renders
            template = template.get("default")
        return detect_content_format(template if isinstance(template, str) else None)

    def render(self, request: ChatRequest) -> RenderedChat:
        """Render and tokenize one request (blocking). Raises InvalidRequest on any refusal."""
        prompt = self.render_prompt(request)
        token_ids = self._handle.tokenizer.encode(prompt, add_special_tokens=False)
        return RenderedChat(prompt, list(token_ids))

    def render_prompt(self, request: ChatRequest) -> str:
        """The rendered prompt text (blocking). Raises InvalidRequest on any refusal."""
        prompt = self._render_text(request, self._pick_template(request))
        check_text(prompt, "the rendered chat prompt")
        return prompt

    def _pick_template(self, request: ChatRequest) -> str | None:
        if request.chat_template is not None:
            if not self._trust_request_template:
                raise InvalidRequest(
                    "a chat template in the request is refused: this server does not trust "
                    "request chat templates (start it with --trust-request-chat-template)"
                )
            return request.chat_template
        if not self._handle.has_chat_template:
            raise InvalidRequest(
                f"the tokenizer of {self._handle.name!r} has no chat template (transformers 5 "
                "has no default one); start the server with --chat-template, or send a "
                "completion request with the prompt as text"
            )
        return self._handle.chat_template  # None: the tokenizer's own

    def _render_text(self, request: ChatRequest, template: str | None) -> str:
        tokenizer = self._handle.tokenizer

        def render() -> str:
            return tokenizer.apply_chat_template(
                request.messages,
                tools=request.tools,
                documents=request.documents,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                tokenize=False,
                chat_template=template,
                **request.kwargs,
            )

        try:
            prompt = run_with_deadline(render, self._timeout_s)
        except _RenderDeadline:
            raise InvalidRequest(
                f"chat template rendering exceeded {self._timeout_s:g} s and was stopped"
            ) from None
        except Exception as exc:  # the template is code from outside: any error is the input's
            logger.info("chat template rendering failed: %s: %s", type(exc).__name__, exc)
            raise InvalidRequest(
                f"chat template rendering failed: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(prompt, str):
            raise InvalidRequest(
                f"chat template rendering returned {type(prompt).__name__}, expected text"
            )
        return prompt


def run_with_deadline(fn, timeout_s: float):
    """Run `fn()` in this thread; raise _RenderDeadline in it once `timeout_s` has passed.

    Python calls anywhere and each line of compiled Jinja code check the clock. The previous
    trace function (a debugger, coverage) is restored afterwards.
    """
    deadline = time.monotonic() + timeout_s
    clock = time.monotonic

    def trace_lines(frame, event, arg):
        if clock() > deadline:
            raise _RenderDeadline
        return trace_lines

    def trace_calls(frame, event, arg):
        if clock() > deadline:
            raise _RenderDeadline
        return trace_lines if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        return fn()
    finally:
        sys.settrace(previous)
