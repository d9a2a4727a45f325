from splitserve.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special_tokens", "lora_path")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special_tokens: bool
    lora_path: str
    def __init__(self, text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ..., lora_path: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("token_ids", "skip_special_tokens", "lora_path")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_special_tokens: bool
    lora_path: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., skip_special_tokens: _Optional[bool] = ..., lora_path: _Optional[str] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class DecodeEachRequest(_message.Message):
    __slots__ = ("token_ids", "lora_path")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    lora_path: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., lora_path: _Optional[str] = ...) -> None: ...

class DecodeEachResponse(_message.Message):
    __slots__ = ("tokens", "token_bytes")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_bytes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., token_bytes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DetokenizeStart(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "skip_special_tokens", "stop", "include_stop_str_in_output", "lora_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_special_tokens: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    include_stop_str_in_output: bool
    lora_path: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., skip_special_tokens: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., include_stop_str_in_output: _Optional[bool] = ..., lora_path: _Optional[str] = ...) -> None: ...

class DetokenizeStreamRequest(_message.Message):
    __slots__ = ("start", "tokens")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    start: DetokenizeStart
    tokens: TokenIds
    def __init__(self, start: _Optional[_Union[DetokenizeStart, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeStreamResponse(_message.Message):
    __slots__ = ("text", "stopped", "stop_reason", "flushed")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    text: str
    stopped: bool
    stop_reason: str
    flushed: bool
    def __init__(self, text: _Optional[str] = ..., stopped: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., flushed: _Optional[bool] = ...) -> None: ...

class ChatInput(_message.Message):
    __slots__ = ("messages_json", "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs_json", "tools_json", "images", "documents_json", "audio")
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FINAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    messages_json: str
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template: str
    chat_template_kwargs_json: str
    tools_json: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    documents_json: str
    audio: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, messages_json: _Optional[str] = ..., add_generation_prompt: _Optional[bool] = ..., continue_final_message: _Optional[bool] = ..., chat_template: _Optional[str] = ..., chat_template_kwargs_json: _Optional[str] = ..., tools_json: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., documents_json: _Optional[str] = ..., audio: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("chat", "prompts", "transcription", "bad_words", "grammar", "truncate_prompt_tokens", "return_prompt_text", "lora_path")
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    chat: ChatInput
    prompts: PromptList
    transcription: TranscriptionInput
    bad_words: _containers.RepeatedScalarFieldContainer[str]
    grammar: _common_pb2.GrammarSpec
    truncate_prompt_tokens: int
    return_prompt_text: bool
    lora_path: str
    def __init__(self, chat: _Optional[_Union[ChatInput, _Mapping]] = ..., prompts: _Optional[_Union[PromptList, _Mapping]] = ..., transcription: _Optional[_Union[TranscriptionInput, _Mapping]] = ..., bad_words: _Optional[_Iterable[str]] = ..., grammar: _Optional[_Union[_common_pb2.GrammarSpec, _Mapping]] = ..., truncate_prompt_tokens: _Optional[int] = ..., return_prompt_text: _Optional[bool] = ..., lora_path: _Optional[str] = ...) -> None: ...

class TranscriptionInput(_message.Message):
    __slots__ = ("audio", "task", "language", "prompt", "timestamps")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    audio: bytes
    task: str
    language: str
    prompt: str
    timestamps: bool
    def __init__(self, audio: _Optional[bytes] = ..., task: _Optional[str] = ..., language: _Optional[str] = ..., prompt: _Optional[str] = ..., timestamps: _Optional[bool] = ...) -> None: ...

class PromptList(_message.Message):
    __slots__ = ("prompts", "add_special_tokens")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[PromptInput]
    add_special_tokens: bool
    def __init__(self, prompts: _Optional[_Iterable[_Union[PromptInput, _Mapping]]] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class PromptInput(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class PreparedPrompt(_message.Message):
    __slots__ = ("token_ids", "text", "mm_inputs", "audio_start_seconds")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    mm_inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultiModalInput]
    audio_start_seconds: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., mm_inputs: _Optional[_Iterable[_Union[_common_pb2.MultiModalInput, _Mapping]]] = ..., audio_start_seconds: _Optional[float] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("prompts", "bad_words_token_ids", "grammar", "compile_seconds", "audio_seconds")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[PreparedPrompt]
    bad_words_token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    grammar: _common_pb2.CompiledGrammar
    compile_seconds: float
    audio_seconds: float
    def __init__(self, prompts: _Optional[_Iterable[_Union[PreparedPrompt, _Mapping]]] = ..., bad_words_token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., grammar: _Optional[_Union[_common_pb2.CompiledGrammar, _Mapping]] = ..., compile_seconds: _Optional[float] = ..., audio_seconds: _Optional[float] = ...) -> None: ...

class GetDecoderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecoderSpec(_message.Message):
    __slots__ = ("tokenizer_json", "skip_special_ids", "vocab_size", "max_stop_strings")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_IDS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: str
    skip_special_ids: _containers.RepeatedScalarFieldContainer[int]
    vocab_size: int
    max_stop_strings: int
    def __init__(self, tokenizer_json: _Optional[str] = ..., skip_special_ids: _Optional[_Iterable[int]] = ..., vocab_size: _Optional[int] = ..., max_stop_strings: _Optional[int] = ...) -> None: ...

class GetTokenizerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("vocab_size", "eos_token_id", "bos_token_id", "has_chat_template", "name", "max_token_chars", "supports_transcription")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_CHARS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_TRANSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    eos_token_id: int
    bos_token_id: int
    has_chat_template: bool
    name: str
    max_token_chars: int
    supports_transcription: bool
    def __init__(self, vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., name: _Optional[str] = ..., max_token_chars: _Optional[int] = ..., supports_transcription: _Optional[bool] = ...) -> None: ...
