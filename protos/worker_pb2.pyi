from splitserve.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ("block_size", "engine")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    engine: _common_pb2.EngineConfig
    def __init__(self, block_size: _Optional[int] = ..., engine: _Optional[_Union[_common_pb2.EngineConfig, _Mapping]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("rank", "world_size", "vocab_size", "max_model_len", "eos_token_ids", "bytes_per_block", "available_kv_bytes", "model", "sampling_defaults", "runner_info", "engine", "cache_specs", "eplb_step_interval")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    RUNNER_INFO_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CACHE_SPECS_FIELD_NUMBER: _ClassVar[int]
    EPLB_STEP_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bytes_per_block: int
    available_kv_bytes: int
    model: str
    sampling_defaults: _common_pb2.SamplingDefaults
    runner_info: _common_pb2.RunnerInfo
    engine: _common_pb2.EngineConfig
    cache_specs: _containers.RepeatedCompositeFieldContainer[LayerCacheSpec]
    eplb_step_interval: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bytes_per_block: _Optional[int] = ..., available_kv_bytes: _Optional[int] = ..., model: _Optional[str] = ..., sampling_defaults: _Optional[_Union[_common_pb2.SamplingDefaults, _Mapping]] = ..., runner_info: _Optional[_Union[_common_pb2.RunnerInfo, _Mapping]] = ..., engine: _Optional[_Union[_common_pb2.EngineConfig, _Mapping]] = ..., cache_specs: _Optional[_Iterable[_Union[LayerCacheSpec, _Mapping]]] = ..., eplb_step_interval: _Optional[int] = ...) -> None: ...

class LayerCacheSpec(_message.Message):
    __slots__ = ("layer_idx", "kind", "block_size", "num_kv_heads", "head_dim", "sliding_window", "conv_state_shape", "ssm_state_shape", "dtype", "page_bytes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[LayerCacheSpec.Kind]
        KIND_FULL_ATTENTION: _ClassVar[LayerCacheSpec.Kind]
        KIND_SLIDING_WINDOW: _ClassVar[LayerCacheSpec.Kind]
        KIND_RECURRENT_STATE: _ClassVar[LayerCacheSpec.Kind]
    KIND_UNSPECIFIED: LayerCacheSpec.Kind
    KIND_FULL_ATTENTION: LayerCacheSpec.Kind
    KIND_SLIDING_WINDOW: LayerCacheSpec.Kind
    KIND_RECURRENT_STATE: LayerCacheSpec.Kind
    LAYER_IDX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CONV_STATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SSM_STATE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    layer_idx: int
    kind: LayerCacheSpec.Kind
    block_size: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    conv_state_shape: _containers.RepeatedScalarFieldContainer[int]
    ssm_state_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    page_bytes: int
    def __init__(self, layer_idx: _Optional[int] = ..., kind: _Optional[_Union[LayerCacheSpec.Kind, str]] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., sliding_window: _Optional[int] = ..., conv_state_shape: _Optional[_Iterable[int]] = ..., ssm_state_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., page_bytes: _Optional[int] = ...) -> None: ...

class InitializeCacheRequest(_message.Message):
    __slots__ = ("num_blocks", "block_size", "num_state_slots")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_STATE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    num_state_slots: int
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., num_state_slots: _Optional[int] = ...) -> None: ...

class InitializeCacheResponse(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    def __init__(self, seconds: _Optional[float] = ...) -> None: ...

class NewRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling_params", "block_ids", "num_computed_tokens", "num_prompt_tokens", "grammar", "grammar_spec", "trace_context", "lora_name", "lora_path", "lora_int_id", "mm_inputs", "state_slot", "restore_state_slot")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_SPEC_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_PATH_FIELD_NUMBER: _ClassVar[int]
    LORA_INT_ID_FIELD_NUMBER: _ClassVar[int]
    MM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_SLOT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_STATE_SLOT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    num_prompt_tokens: int
    grammar: _common_pb2.CompiledGrammar
    grammar_spec: _common_pb2.GrammarSpec
    trace_context: _containers.ScalarMap[str, str]
    lora_name: str
    lora_path: str
    lora_int_id: int
    mm_inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultiModalInput]
    state_slot: int
    restore_state_slot: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., grammar: _Optional[_Union[_common_pb2.CompiledGrammar, _Mapping]] = ..., grammar_spec: _Optional[_Union[_common_pb2.GrammarSpec, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., lora_name: _Optional[str] = ..., lora_path: _Optional[str] = ..., lora_int_id: _Optional[int] = ..., mm_inputs: _Optional[_Iterable[_Union[_common_pb2.MultiModalInput, _Mapping]]] = ..., state_slot: _Optional[int] = ..., restore_state_slot: _Optional[int] = ...) -> None: ...

class CachedRequest(_message.Message):
    __slots__ = ("request_id", "new_block_ids", "num_computed_tokens", "new_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "new_requests", "cached_requests", "num_scheduled_tokens", "finished_request_ids", "state_snapshots", "lora_evictions", "lora_slots", "encoder_evictions", "rebalance_experts")
    class NumScheduledTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    LORA_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LORA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REBALANCE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    new_requests: _containers.RepeatedCompositeFieldContainer[NewRequest]
    cached_requests: _containers.RepeatedCompositeFieldContainer[CachedRequest]
    num_scheduled_tokens: _containers.ScalarMap[str, int]
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    state_snapshots: _containers.RepeatedCompositeFieldContainer[StateSnapshot]
    lora_evictions: _containers.RepeatedCompositeFieldContainer[LoRAKey]
    lora_slots: _containers.RepeatedCompositeFieldContainer[LoRASlot]
    encoder_evictions: _containers.RepeatedScalarFieldContainer[bytes]
    rebalance_experts: bool
    def __init__(self, step_id: _Optional[int] = ..., new_requests: _Optional[_Iterable[_Union[NewRequest, _Mapping]]] = ..., cached_requests: _Optional[_Iterable[_Union[CachedRequest, _Mapping]]] = ..., num_scheduled_tokens: _Optional[_Mapping[str, int]] = ..., finished_request_ids: _Optional[_Iterable[str]] = ..., state_snapshots: _Optional[_Iterable[_Union[StateSnapshot, _Mapping]]] = ..., lora_evictions: _Optional[_Iterable[_Union[LoRAKey, _Mapping]]] = ..., lora_slots: _Optional[_Iterable[_Union[LoRASlot, _Mapping]]] = ..., encoder_evictions: _Optional[_Iterable[bytes]] = ..., rebalance_experts: _Optional[bool] = ...) -> None: ...

class LoRAKey(_message.Message):
    __slots__ = ("lora_name", "lora_int_id")
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    LORA_INT_ID_FIELD_NUMBER: _ClassVar[int]
    lora_name: str
    lora_int_id: int
    def __init__(self, lora_name: _Optional[str] = ..., lora_int_id: _Optional[int] = ...) -> None: ...

class LoRASlot(_message.Message):
    __slots__ = ("adapter", "slot")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    adapter: LoRAKey
    slot: int
    def __init__(self, adapter: _Optional[_Union[LoRAKey, _Mapping]] = ..., slot: _Optional[int] = ...) -> None: ...

class StateSnapshot(_message.Message):
    __slots__ = ("request_id", "slot")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slot: int
    def __init__(self, request_id: _Optional[str] = ..., slot: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "request_ids", "token_ids", "logprobs", "prompt_logprobs", "errors", "grammar_terminated_ids", "deferred_request_ids", "pooled", "eplb")
    class PromptLogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PromptLogprobs
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PromptLogprobs, _Mapping]] = ...) -> None: ...
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_TERMINATED_IDS_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    EPLB_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    prompt_logprobs: _containers.MessageMap[str, PromptLogprobs]
    errors: _containers.ScalarMap[str, str]
    grammar_terminated_ids: _containers.RepeatedScalarFieldContainer[str]
    deferred_request_ids: _containers.RepeatedScalarFieldContainer[str]
    pooled: _containers.RepeatedCompositeFieldContainer[PooledOutput]
    eplb: EplbReport
    def __init__(self, step_id: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Mapping[str, PromptLogprobs]] = ..., errors: _Optional[_Mapping[str, str]] = ..., grammar_terminated_ids: _Optional[_Iterable[str]] = ..., deferred_request_ids: _Optional[_Iterable[str]] = ..., pooled: _Optional[_Iterable[_Union[PooledOutput, _Mapping]]] = ..., eplb: _Optional[_Union[EplbReport, _Mapping]] = ...) -> None: ...

class EplbReport(_message.Message):
    __slots__ = ("num_rebalances", "balancedness_before", "balancedness_after", "layers_moved", "experts_received")
    NUM_REBALANCES_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_MOVED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    num_rebalances: int
    balancedness_before: float
    balancedness_after: float
    layers_moved: int
    experts_received: int
    def __init__(self, num_rebalances: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., layers_moved: _Optional[int] = ..., experts_received: _Optional[int] = ...) -> None: ...

class PooledOutput(_message.Message):
    __slots__ = ("request_id", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    data: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., data: _Optional[_Iterable[float]] = ...) -> None: ...

class PromptLogprobs(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, entries: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class GetStageStatsRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("rank", "num_steps", "compute_seconds", "recv_wait_seconds", "send_wait_seconds", "step_wait_seconds", "wall_seconds")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECV_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEND_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    num_steps: int
    compute_seconds: float
    recv_wait_seconds: float
    send_wait_seconds: float
    step_wait_seconds: float
    wall_seconds: float
    def __init__(self, rank: _Optional[int] = ..., num_steps: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., recv_wait_seconds: _Optional[float] = ..., send_wait_seconds: _Optional[float] = ..., step_wait_seconds: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...
