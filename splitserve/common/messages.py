"""The engine's own messages: what the scheduler plans (a step), what a worker answers (a step
result) and what a request carries into the scheduler (its sampling parameters, constraint,
images), as plain dataclasses.

The scheduler, the worker's model runner and the in-process `LLM` work on these; protobuf
appears only at the gRPC edges, which convert (`splitserve.common.messages_proto`): the
scheduler's executor to the workers (`scheduler/executor_grpc.py`), the worker's Execute stream
(`worker/server.py`) and the scheduler's Generate / Submit calls (`scheduler/server.py`). So the
in-process engine builds no protobuf message per step.

Why here: both the scheduler (which must not import torch) and the worker import them, and
neither package may depend on the other; `splitserve/common` is the torch-free place both already
use. This module imports neither protobuf nor torch.

Field names are those of the protobuf messages in protos/*.proto, with their meaning (see the
comments there); a proto3 `optional` field is None when unset, a repeated field a list, a map
a dict, a message field None when absent. `tests/common/test_messages.py` checks every field
against the proto descriptors, so a field added to a .proto and not here fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """common.SamplingParams: the engine's form (unset fields None; see common.proto for the
    value each takes then). Not the user-facing `splitserve.SamplingParams`, which builds it."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    n: int | None = None
    allowed_token_ids: list[int] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    """The banned sequences (each a TokenIdSequence's token_ids on the wire)."""


@dataclass(slots=True)
class TokenLogprobs:
    """common.TokenLogprobs: the log-probabilities at one position."""

    token_id: int = 0
    logprob: float = 0.0
    rank: int = 0
    """1-based; a real entry never has 0 (an empty wire entry reads back as None)."""
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class GrammarSpec:
    """common.GrammarSpec: a constraint as the client stated it."""

    kind: str = ""
    spec: str = ""
    backend: str = ""
    whitespace_pattern: str = ""


@dataclass(slots=True)
class CompiledGrammar:
    """common.CompiledGrammar: a constraint compiled for the sampling rank (by handle)."""

    handle: str = ""
    backend: str = ""
    compiled: bytes = b""


@dataclass(slots=True)
class TensorData:
    """common.TensorData: a dense tensor as raw little-endian bytes."""

    dtype: str = ""
    shape: list[int] = field(default_factory=list)
    data: bytes = b""


@dataclass(slots=True)
class MultiModalInput:
    """common.MultiModalInput: one preprocessed image or audio clip of a prompt and its
    placeholder span."""

    modality: str = ""
    pixel_values: TensorData | None = None
    hash: bytes = b""
    offset: int = 0
    length: int = 0
    input_features: TensorData | None = None
    num_frames: int = 0
    image_size: list[int] = field(default_factory=list)
    """Any-resolution images: the original [height, width]; empty otherwise."""


@dataclass(slots=True)
class GenerateRequest:
    """scheduler.GenerateRequest: one sequence to generate (or, pooling, to embed)."""

    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    lora_name: str = ""
    priority: int = 0
    grammar: GrammarSpec | None = None
    lora_path: str = ""
    cache_salt: str = ""
    lora_int_id: int = 0
    mm_inputs: list[MultiModalInput] = field(default_factory=list)
    pooling: bool = False
    dimensions: int | None = None
    normalize: bool | None = None
    compiled_grammar: CompiledGrammar | None = None
    heartbeat_interval_s: float = 0.0
    """The Generate call's own (its server sends heartbeats); the engine ignores it."""


@dataclass(slots=True)
class NewRequest:
    """worker.NewRequest: a request the workers have not seen (or resumed), in full."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_prompt_tokens: int = 0
    grammar: CompiledGrammar | None = None
    grammar_spec: GrammarSpec | None = None
    trace_context: dict[str, str] = field(default_factory=dict)
    lora_name: str = ""
    lora_path: str = ""
    lora_int_id: int = 0
    mm_inputs: list[MultiModalInput] = field(default_factory=list)
    state_slot: int = -1
    """Recurrent-state slot (models with state-space layers); -1: none."""
    restore_state_slot: int = -1
    """A prefix-cache hit: the snapshot slot to copy into state_slot first; -1: none."""


@dataclass(slots=True)
class CachedRequest:
    """worker.CachedRequest: a running request, only what changed."""

    request_id: str = ""
    new_block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class StepRequest:
    """worker.StepRequest: one step the scheduler planned."""

    step_id: int = 0
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: list[str] = field(default_factory=list)
    lora_evictions: list[tuple[str, int]] = field(default_factory=list)
    """(adapter name, load number) to drop before the new requests are added."""
    lora_slots: list[tuple[tuple[str, int], int]] = field(default_factory=list)
    """((adapter name, load number), device slot) to fill before the forward."""
    encoder_evictions: list[bytes] = field(default_factory=list)
    """Item hashes whose encoder outputs the first rank drops before this step."""
    state_snapshots: list[tuple[str, int]] = field(default_factory=list)
    """(request id, snapshot slot): copy the request's recurrent state there after the step."""
    rebalance_experts: bool = False
    """EPLB: re-place the MoE experts before this step's forward (every step_interval steps)."""


@dataclass(slots=True)
class PooledOutput:
    """worker.PooledOutput: the pooled hidden state of one request."""

    request_id: str = ""
    data: list[float] = field(default_factory=list)


@dataclass(slots=True)
class EplbReport:
    """worker.EplbReport: one EPLB rebalance of a stage's MoE layers."""

    num_rebalances: int = 0
    balancedness_before: float = 0.0
    balancedness_after: float = 0.0
    layers_moved: int = 0
    experts_received: int = 0


@dataclass(slots=True)
class StepResult:
    """worker.StepResult: what one step produced (see worker.proto)."""

    step_id: int = 0
    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    """Empty when no request of the step asked for logprobs; otherwise one per request id,
    None for those that did not ask."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request id, the prompt positions computed this step (PromptLogprobs.entries)."""
    errors: dict[str, str] = field(default_factory=dict)
    grammar_terminated_ids: list[str] = field(default_factory=list)
    deferred_request_ids: list[str] = field(default_factory=list)
    pooled: list[PooledOutput] = field(default_factory=list)
    eplb: EplbReport | None = None
    """Set on the result of a step that rebalanced the experts."""
