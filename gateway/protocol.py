"""OpenAI (and vLLM-extension) request and response models.

Requests ignore unknown fields, as OpenAI and vLLM do. Integers are strict (no bools, floats or
numeric strings) and floats must be finite, so "not an integer" is a 400, not a silent cast.
Every request body is screened once for NUL characters and lone surrogates, which would
otherwise reach the tokenizer or a log as invalid text.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)

Int = Annotated[int, Strict()]
Int32 = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
Float = Annotated[float, Strict()]
TokenIds = list[Int]
# A batch may mix texts and token-id lists (as the lead's e2e test sends).
PromptInput = str | TokenIds | list[str | TokenIds]


def _unsafe_string(value: Any, path: str) -> tuple[str, str] | None:
    """(path, problem) of the first string holding NUL or a lone surrogate, else None."""
    if isinstance(value, str):
        if "\x00" in value:
            return path, "NUL characters are not allowed"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, "strings must be valid Unicode (a lone surrogate was found)"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            found = _unsafe_string(k, sub) or _unsafe_string(v, sub)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unsafe_string(v, f"{path}[{i}]")
            if found:
                return found
    return None


class OpenAIModel(BaseModel):
    """Base of every request: unknown fields ignored, no NaN or infinity."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestModel(OpenAIModel):
    """A top-level request body: screened for unsafe strings before field validation; the
    names of fields it ignores are logged once per request, as vLLM does."""

    @model_validator(mode="before")
    @classmethod
    def _screen_strings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ignored = [k for k in data if k not in cls.model_fields]
            if ignored:
                logger.warning(
                    "The following fields were present in the request but ignored: %s",
                    sorted(ignored)[:20],
                )
        found = _unsafe_string(data, "")
        if found:
            path, problem = found
            param = path.split(".")[0].split("[")[0] or None
            raise PydanticCustomError(
                "unsafe_string",
                "{problem} (in '{path}')",
                {"problem": problem, "path": path, "param": param},
            )
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool | None = True
    """Send a final chunk with the usage and empty choices."""
    continuous_usage_stats: bool | None = False
    """Put the running usage in every chunk (vLLM)."""


class ResponseFormat(OpenAIModel):
    type: str
    json_schema: dict[str, Any] | None = None


class SamplingFields(RequestModel):
    """Sampling fields shared by completions and chat completions (OpenAI + vLLM extras)."""

    model: str | None = None
    n: Int | None = 1
    temperature: Float | None = None
    top_p: Float | None = None
    presence_penalty: Float | None = 0.0
    frequency_penalty: Float | None = 0.0
    logit_bias: dict[str, Float] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions.
    top_k: Int32 | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: Int32 = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Int | None = None
    priority: Int32 = 0
    truncate_prompt_tokens: Int | None = None
    cache_salt: str | None = None
    """Only requests with the same salt share prefix-cache blocks (vLLM)."""
    allowed_token_ids: list[Int] | None = None
    """Only these token ids may be sampled (vLLM)."""
    bad_words: list[str] | None = None
    """Words never generated: each is tokenized (with and without a leading space) and the
    last token of a sequence is banned whenever the output ends with the rest of it (vLLM)."""
    return_tokens_as_token_ids: bool | None = None
    """Logprob tokens as "token_id:N" instead of text (vLLM; --return-tokens-as-token-ids
    sets the default)."""
    return_token_ids: bool | None = None
    """Put the prompt's and each choice's token ids in the response (vLLM)."""
    request_id: str | None = None
    """The id of the response (vLLM: chatcmpl-/cmpl- plus this); random when unset."""
    # vLLM extensions splitserve refuses by name rather than ignore (vllm_extras.py).
    use_beam_search: bool = False
    length_penalty: Float = 1.0
    logits_processors: Any | None = None
    vllm_xargs: Any | None = None
    kv_transfer_params: Any | None = None
    # Structured outputs (gateway/structured.py checks the shapes, naming the field).
    structured_outputs: Any | None = None
    guided_json: Any | None = None
    guided_regex: Any | None = None
    guided_choice: Any | None = None
    guided_grammar: Any | None = None
    guided_decoding_backend: Any | None = None
    guided_whitespace_pattern: Any | None = None

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise PydanticCustomError(
                "cache_salt",
                "cache_salt must be a non-empty string when given",
                {"param": "cache_salt"},
            )
        return value


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput
    max_tokens: Int | None = None
    logprobs: Int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Int | None = None
    prompt_embeds: Any | None = None
    """Refused (vllm_extras.py): prompts are text or token ids."""
    add_special_tokens: bool = True

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_type",
                "prompt must be a string, a list of strings, a list of token ids "
                "or a list of lists of token ids",
            ) from None


class ContentPart(OpenAIModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    """One chat message; extra keys (e.g. reasoning_content) are passed to the template."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions.
    mm_processor_kwargs: Any | None = None
    """Refused (vllm_extras.py): no multimodal inputs."""
    include_reasoning: bool = True
    """With --reasoning-parser: false drops the reasoning text from the response."""
    documents: list[dict[str, str]] | None = None
    """Retrieved passages for RAG chat templates, passed to the template as `documents`."""
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeCompletionRequest(RequestModel):
    """POST /tokenize with a prompt (vLLM)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestModel):
    """POST /tokenize with chat messages (vLLM)."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(RequestModel):
    """POST /detokenize (vLLM)."""

    model: str | None = None
    tokens: list[Int]


# ----------------------------------------------------------------------------- responses


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokenUsageInfo(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs format."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One candidate of vLLM's prompt_logprobs entries."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    """With return_token_ids (vLLM)."""
    token_ids: list[int] | None = None
    """With return_token_ids (vLLM)."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    """With return_token_ids, on the first chunk of each choice (vLLM)."""
    token_ids: list[int] | None = None
    """With return_token_ids, the ids this chunk adds (vLLM)."""


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning: str | None = None
    """The `<think>` text, with --reasoning-parser (current vLLM's field name)."""
    reasoning_content: str | None = None
    """The same text under vLLM's former name, which many clients read."""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    """With return_token_ids (vLLM)."""


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    """With return_token_ids (vLLM)."""


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    """With return_token_ids, the ids this chunk adds (vLLM)."""


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
    """With return_token_ids, on the first chunk of each choice (vLLM)."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "splitserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ServerLoad(BaseModel):
    """GET /load (with --enable-server-load-tracking)."""

    server_load: int
    """Completions and chat requests in flight."""
