"""Scheduler configuration: one typed dataclass; the CLI flags are generated from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.common.engine_config import engine_fields
from splitserve.common.lora import check_lora_fields
from splitserve.common.tracing import check_endpoint

SCHEDULING_POLICIES = ("fcfs", "priority")
MIN_ENCODER_TOKENS = 8192
"""Default floor of both encoder budgets: above the largest item of the supported models
(LLaVA-NeXT's any-resolution images, 30 s of Qwen2-Audio)."""


@dataclass
class SchedulerConfig(
    engine_fields(
        "max_model_len",
        "max_num_batched_tokens",
        "max_num_seqs",
        "max_logprobs",
        "enable_lora",
        "max_loras",
        "lora_extra_vocab_size",
    )
):
    """Continuous batching and KV-cache settings (vLLM's flag names); the engine fields it
    shares with the workers and the gateway are declared in splitserve.common.engine_config."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes (chained SHA-256 of full blocks)."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps within the token budget."""
    num_gpu_blocks_override: int | None = None
    """Use this many KV blocks instead of the number the workers' memory profile gives."""
    max_waiting_requests: int = 4096
    """Waiting-queue length past which new requests are refused with RESOURCE_EXHAUSTED."""
    async_scheduling_depth: int = 2
    """Steps sent to the workers before the oldest result is back (2 overlaps scheduling
    with compute; 1 is strictly synchronous). With P > 1 pipeline ranks, P steps (one
    micro-batch per stage) are in flight instead."""
    async_scheduling: bool | None = None
    """vLLM's switch for overlapping scheduling with the model step: on means async_scheduling_depth 2, off means 1 (strictly synchronous); unset leaves async_scheduling_depth as given."""
    scheduling_policy: str = "fcfs"
    """Order of the waiting queue (vLLM's flag): fcfs (arrival order; a request with a non-zero priority is refused) or priority (lower priority value first, then arrival; when KV blocks run out the running request with the highest value is preempted first)."""
    disable_log_stats: bool = False
    """Do not log the engine's periodic stats line (prompt and generation throughput, running and waiting requests, KV-cache usage, prefix-cache hit rate); its interval is VLLM_LOG_STATS_INTERVAL seconds (default 10)."""
    worker_step_timeout_s: float = 300.0
    """Longest wait for a step's result from the workers once the engine runs (start-up is
    excluded); past it a rank is taken as stalled: in-flight requests fail, health turns
    NOT_SERVING and the scheduler exits non-zero. Leave room for the largest prefill chunk
    and a first CUDA-graph capture (vLLM bounds the same wait by
    VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, 300 s)."""
    worker_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1:50053"])
    """gRPC addresses of the pipeline ranks, rank 0 first (several per value when
    comma-separated)."""
    max_cpu_loras: int | None = None
    """LoRA adapters the workers keep loaded in CPU memory (least recently used evicted, as the scheduler decides); None means max_loras."""
    max_num_encoder_input_tokens: int | None = None
    """Encoder output tokens (image or audio placeholder tokens) one step may encode; chunks stop before an item that does not fit. None: max(max_num_batched_tokens, 8192) (vLLM's name)."""
    encoder_cache_size: int | None = None
    """Encoder output tokens the first worker rank keeps, keyed by the item's hash, so the same image or clip in a later request is not encoded again (least recently used evicted). None: max(max_num_batched_tokens, 8192) (vLLM's name)."""
    lora_modules: list[str] | None = None
    """LoRA adapters loaded at start, as name=path or JSON (vLLM's --lora-modules); with --enable-lora, every front end then serves them (the scheduler never opens their files: the gateway and the workers check them)."""
    otlp_traces_endpoint: str | None = None
    """OTLP URL to export traces to (protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: grpc or
    http/protobuf); None exports nothing and installs no instrumentation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        for name in ("max_num_encoder_input_tokens", "encoder_cache_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        # A comma-separated item is several addresses (one flag value from an env variable).
        self.worker_addresses = [
            a.strip() for item in self.worker_addresses for a in item.split(",") if a.strip()
        ]
        if not self.worker_addresses:
            raise ValueError("worker_addresses must name at least one worker")
        check_endpoint(self.otlp_traces_endpoint)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
        if not self.worker_step_timeout_s > 0:
            raise ValueError(f"worker_step_timeout_s must be > 0, got {self.worker_step_timeout_s}")
        if self.async_scheduling_depth not in (1, 2, 3):
            raise ValueError(
                f"async_scheduling_depth must be 1, 2 or 3, got {self.async_scheduling_depth}"
            )
        self._apply_async_scheduling()
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                f"got {self.scheduling_policy!r}"
            )

    def _apply_async_scheduling(self) -> None:
        """--async-scheduling / --no-async-scheduling as an async_scheduling_depth."""
        if self.async_scheduling is None:
            return
        if self.async_scheduling and self.async_scheduling_depth == 1:
            raise ValueError(
                "--async-scheduling contradicts --async-scheduling-depth 1 (synchronous); give one"
            )
        if not self.async_scheduling:
            if self.async_scheduling_depth == 3:
                raise ValueError(
                    "--no-async-scheduling contradicts --async-scheduling-depth 3; give one"
                )
            self.async_scheduling_depth = 1

    def check_model_len(self, max_model_len: int) -> None:
        """Checks that need the final context length."""
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens})"
                f" must be >= max_model_len ({max_model_len})"
            )

    # NOTE: the defaults are resolved here, not written back into the fields, so that a
    # field left unset is not passed on to a child process as if it had been given.

    @property
    def encoder_budget(self) -> int:
        """max_num_encoder_input_tokens, its default resolved."""
        return self.max_num_encoder_input_tokens or max(
            self.max_num_batched_tokens, MIN_ENCODER_TOKENS
        )

    @property
    def encoder_cache_tokens(self) -> int:
        """encoder_cache_size, its default resolved."""
        return self.encoder_cache_size or max(self.max_num_batched_tokens, MIN_ENCODER_TOKENS)
