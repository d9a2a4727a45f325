from splitserve.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadLoRAAdapterRequest(_message.Message):
    __slots__ = ("lora_name", "lora_path", "base_model_name", "if_absent")
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IF_ABSENT_FIELD_NUMBER: _ClassVar[int]
    lora_name: str
    lora_path: str
    base_model_name: str
    if_absent: bool
    def __init__(self, lora_name: _Optional[str] = ..., lora_path: _Optional[str] = ..., base_model_name: _Optional[str] = ..., if_absent: _Optional[bool] = ...) -> None: ...

class UnloadLoRAAdapterRequest(_message.Message):
    __slots__ = ("lora_name",)
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    lora_name: str
    def __init__(self, lora_name: _Optional[str] = ...) -> None: ...

class ListLoRAAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLoRAAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[LoRAAdapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[LoRAAdapter, _Mapping]]] = ...) -> None: ...

class LoRAAdapter(_message.Message):
    __slots__ = ("lora_name", "lora_path", "lora_int_id", "base_model_name")
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    LORA_INT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    lora_name: str
    lora_path: str
    lora_int_id: int
    base_model_name: str
    def __init__(self, lora_name: _Optional[str] = ..., lora_path: _Optional[str] = ..., lora_int_id: _Optional[int] = ..., base_model_name: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "lora_name", "priority", "grammar", "lora_path", "cache_salt", "lora_int_id", "mm_inputs", "pooling", "dimensions", "normalize", "compiled_grammar", "heartbeat_interval_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LORA_INT_ID_FIELD_NUMBER: _ClassVar[int]
    MM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    lora_name: str
    priority: int
    grammar: _common_pb2.GrammarSpec
    lora_path: str
    cache_salt: str
    lora_int_id: int
    mm_inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultiModalInput]
    pooling: bool
    dimensions: int
    normalize: bool
    compiled_grammar: _common_pb2.CompiledGrammar
    heartbeat_interval_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., lora_name: _Optional[str] = ..., priority: _Optional[int] = ..., grammar: _Optional[_Union[_common_pb2.GrammarSpec, _Mapping]] = ..., lora_path: _Optional[str] = ..., cache_salt: _Optional[str] = ..., lora_int_id: _Optional[int] = ..., mm_inputs: _Optional[_Iterable[_Union[_common_pb2.MultiModalInput, _Mapping]]] = ..., pooling: _Optional[bool] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., compiled_grammar: _Optional[_Union[_common_pb2.CompiledGrammar, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "prompt_logprobs", "finish_reason", "stop_token_id", "num_prompt_tokens", "num_cached_tokens", "error", "queue_time_s", "embedding", "prefill_time_s", "decode_time_s")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    finish_reason: _common_pb2.FinishReason
    stop_token_id: int
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str
    queue_time_s: float
    embedding: _containers.RepeatedScalarFieldContainer[float]
    prefill_time_s: float
    decode_time_s: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., error: _Optional[str] = ..., queue_time_s: _Optional[float] = ..., embedding: _Optional[_Iterable[float]] = ..., prefill_time_s: _Optional[float] = ..., decode_time_s: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class StreamOutputsRequest(_message.Message):
    __slots__ = ("stream_id", "heartbeat_interval_s")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    heartbeat_interval_s: float
    def __init__(self, stream_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("stream_id", "request")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    request: GenerateRequest
    def __init__(self, stream_id: _Optional[str] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamedOutput(_message.Message):
    __slots__ = ("request_id", "output", "error_code")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: GenerateResponse
    error_code: str
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Union[GenerateResponse, _Mapping]] = ..., error_code: _Optional[str] = ...) -> None: ...

class OutputBatch(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[StreamedOutput]
    def __init__(self, outputs: _Optional[_Iterable[_Union[StreamedOutput, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("num_waiting", "num_running", "num_total_blocks", "num_free_blocks", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "num_steps", "block_size", "iteration_tokens_bounds", "iteration_tokens_bucket_counts", "iteration_tokens_sum", "enable_prefix_caching", "max_loras", "running_lora_adapters", "waiting_lora_adapters", "encoder_cache_queries", "encoder_cache_hits", "encoder_cache_usage", "eplb_num_rebalances", "eplb_balancedness")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ITERATION_TOKENS_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    ITERATION_TOKENS_BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ITERATION_TOKENS_SUM_FIELD_NUMBER: _ClassVar[int]
    ENABLE_PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    EPLB_NUM_REBALANCES_FIELD_NUMBER: _ClassVar[int]
    EPLB_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    block_size: int
    iteration_tokens_bounds: _containers.RepeatedScalarFieldContainer[float]
    iteration_tokens_bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    iteration_tokens_sum: int
    enable_prefix_caching: bool
    max_loras: int
    running_lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    waiting_lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    encoder_cache_queries: int
    encoder_cache_hits: int
    encoder_cache_usage: float
    eplb_num_rebalances: int
    eplb_balancedness: float
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_total_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., num_steps: _Optional[int] = ..., block_size: _Optional[int] = ..., iteration_tokens_bounds: _Optional[_Iterable[float]] = ..., iteration_tokens_bucket_counts: _Optional[_Iterable[int]] = ..., iteration_tokens_sum: _Optional[int] = ..., enable_prefix_caching: _Optional[bool] = ..., max_loras: _Optional[int] = ..., running_lora_adapters: _Optional[_Iterable[str]] = ..., waiting_lora_adapters: _Optional[_Iterable[str]] = ..., encoder_cache_queries: _Optional[int] = ..., encoder_cache_hits: _Optional[int] = ..., encoder_cache_usage: _Optional[float] = ..., eplb_num_rebalances: _Optional[int] = ..., eplb_balancedness: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("max_model_len", "vocab_size", "eos_token_ids", "model", "max_logprobs", "sampling_defaults", "runner_info", "engine")
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    RUNNER_INFO_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    max_model_len: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    model: str
    max_logprobs: int
    sampling_defaults: _common_pb2.SamplingDefaults
    runner_info: _common_pb2.RunnerInfo
    engine: _common_pb2.EngineConfig
    def __init__(self, max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., max_logprobs: _Optional[int] = ..., sampling_defaults: _Optional[_Union[_common_pb2.SamplingDefaults, _Mapping]] = ..., runner_info: _Optional[_Union[_common_pb2.RunnerInfo, _Mapping]] = ..., engine: _Optional[_Union[_common_pb2.EngineConfig, _Mapping]] = ...) -> None: ...
