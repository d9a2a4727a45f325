"""A request's state inside the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.common import messages as msg

from .block_pool import KVBlock


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: msg.SamplingParams
    max_tokens: int
    """Resolved cap on output tokens (the request's max_tokens within the context)."""
    eos_token_ids: frozenset[int]
    """EOS ids that end this request (empty when ignore_eos)."""
    stop_token_ids: frozenset[int]
    min_tokens: int
    arrival: int
    priority: int = 0
    lora_name: str = ""
    lora_path: str = ""
    """The adapter's folder (with lora_name), passed on to the workers."""
    cache_salt: str = ""
    """vLLM's cache_salt: only requests with the same salt share prefix-cache blocks."""
    lora_int_id: int = 0
    """Which load of the adapter (with lora_name): one load's weights are not another's."""
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose KV is computed or scheduled for computation."""
    num_inflight: int = 0
    """Tokens scheduled to be sampled whose results have not come back yet."""
    blocks: list[KVBlock] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    """Leading blocks registered in the prefix cache."""
    num_skipped_blocks: int = 0
    """Leading blocks released because they fell out of the sliding window (their entries
    stay in `blocks`, not held)."""
    state_slot: int = -1
    restore_state_slot: int = -1
    """Set by a prefix-cache hit on a recurrent model: the snapshot slot the workers copy
    into state_slot when the request (re)starts."""
    """Recurrent-state slot held while running (models with state-space layers); -1: none."""
    num_cached_tokens: int = -1
    """Prompt tokens served by the prefix cache on first schedule (-1 before)."""
    known_to_worker: bool = False
    """The workers hold this request's state (sent as new, not finished since)."""
    num_sent_blocks: int = 0
    """Blocks the workers know for this request."""
    num_sent_tokens: int = 0
    """Tokens the workers were given (pipeline parallelism: ranks other than the last learn
    sampled tokens from the scheduler)."""
    prompt_logprobs_pending: bool = False
    first_scheduled_ns: int = 0
    """Wall-clock time (ns) the request first left the waiting queue; 0 before (tracing)."""
    trace_context: dict[str, str] | None = None
    """W3C trace headers sent to the workers with the request (detailed traces only)."""
    grammar: msg.CompiledGrammar | msg.GrammarSpec | None = None
    """Structured-output constraint, compiled or a spec for the sampling rank to compile; sent
    to the workers with the request (and on resume)."""
    mm_inputs: list[msg.MultiModalInput] = field(default_factory=list)
    """Images of the prompt, sent to the workers with the request (and on resume)."""
    mm_spans: tuple[tuple[int, int, bytes], ...] = ()
    """(offset, length, hash) of each image's placeholder tokens, for the prefix-cache keys."""
    pooling: bool = False
    """An embedding request (pooling runner): prompt-only, finished when its pooled state is back."""
    dimensions: int | None = None
    """With pooling: matryoshka truncation of the pooled vector (None keeps all)."""
    normalize: bool | None = None
    """With pooling: L2-normalize the embedding (None: as the pooler says)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus outputs received."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_inflight(self) -> int:
        return self.num_tokens + self.num_inflight

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_output_with_inflight(self) -> int:
        return len(self.output_token_ids) + self.num_inflight
