"""Worker configuration: one typed dataclass, from which the CLI flags are generated."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from splitserve.common.engine_config import engine_fields
from splitserve.common.generation_config import canonical_override
from splitserve.common.generation_config import check_mode as check_generation_mode
from splitserve.common.hf_overrides import canonical_hf_overrides
from splitserve.common.lora import check_lora_fields
from splitserve.common.pooling import check_runner_fields, parse_pooler_config, resolve_runner
from splitserve.common.tracing import check_endpoint, parse_detailed_traces
from splitserve.worker.cpu_threads import check_bind
from splitserve.worker.eplb.config import EplbConfig, parse_eplb_config

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
"""--kv-cache-dtype values (vLLM's names): auto stores the model's dtype; fp8 is fp8_e4m3."""
GUIDED_DECODING_BACKENDS = ("xgrammar", "guidance", "auto")
QUANTIZATION_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "awq", "mxfp4")
"""Checkpoint formats splitserve loads (config.json quantization_config.quant_method)."""
PP_PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"

DEFAULT_CPU_KV_BYTES = 2 << 30
DEFAULT_IGNORE_PATTERNS = ["original/**/*"]


@dataclass
class WorkerConfig(
    engine_fields(
        "max_model_len",
        "max_num_batched_tokens",
        "max_num_seqs",
        "max_logprobs",
        "enable_lora",
        "max_loras",
        "max_lora_rank",
        "lora_extra_vocab_size",
    )
):
    """What one worker (one pipeline rank) loads and how it runs; the engine fields it shares
    with the scheduler and the gateway are declared in splitserve.common.engine_config."""

    model: str = ""
    """Model folder or Hugging Face hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `model` is a hub id."""
    code_revision: str | None = None
    """Hub revision of the model's code (a config class under auto_map, with trust_remote_code); None uses revision."""
    download_dir: str | None = None
    """Folder hub models are downloaded to and looked up in; None uses the Hugging Face cache."""
    trust_remote_code: bool = False
    """Allow Python code from the model folder: a custom config or tokenizer class (the model itself always runs splitserve's own implementation)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; None uses the model's. (The worker loads it only for structured-output matchers, on the first constrained request.)"""
    guided_decoding_backend: str = "auto"
    """Structured-output backend when a request names none (vLLM's default, auto): auto (xgrammar where it enforces the constraint exactly, else guidance), xgrammar or guidance. The sampling rank reads it for a constraint that reaches it uncompiled (a direct Generate caller's)."""
    dtype: str = "auto"
    """Weight and activation dtype: auto (config's dtype on CUDA, float32 on CPU), float32, bfloat16, float16."""
    seed: int = 0
    """Seed for dummy weights and for sampling of requests without their own seed."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache on CPU; None means 2 GiB, capped to a share of free memory."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory this worker may use: weights, activations, CUDA graphs (measured by a trial capture) and the KV cache, which gets the rest."""
    device: str = "auto"
    """Device: auto (cuda when available), cpu or cuda."""
    load_format: str = "auto"
    """Weights format: auto (safetensors, else .bin/.pt), safetensors, pt (.bin/.pt read with torch.load(weights_only=True)), or dummy (random, reads no weight file)."""
    kv_cache_dtype: str = "auto"
    """KV cache storage (vLLM's flag): auto (the model's dtype), fp8 / fp8_e4m3 (float8_e4m3fn with per-layer scales from the checkpoint's k_scale / v_scale tensors, 1.0 where it has none) or fp8_e5m2 (no scales). Attention reads keys and values as stored, so FP8 changes outputs slightly; it halves (bf16) or quarters (fp32) the KV bytes per token."""
    quantization: str | None = None
    """Quantized checkpoint format (vLLM's flag): None reads config.json's quantization_config; a value must match it (fp8, fbgemm_fp8, compressed-tensors, awq), except fp8 on an unquantized model, which is quantized per channel at load. CPU runs weight-only on weights dequantized at load."""
    max_parallel_loading_workers: int | None = None
    """Threads reading checkpoint shards at once (each holds at most one shard in memory); None: min(8, CPU count)."""
    rank: int = 0
    """Pipeline rank of this worker."""
    pipeline_parallel_size: int = 1
    """Number of pipeline stages the model is split into."""
    tensor_parallel_size: int = 1
    """Number of tensor-parallel ranks each pipeline stage is split over (vLLM's -tp): every layer's heads, MLP features, experts and vocabulary are sharded over them; each rank is its own process, and the stage's rank 0 (its driver) alone talks to the scheduler."""
    tp_rank: int = 0
    """Tensor-parallel rank of this worker within its pipeline stage (0: the stage's driver, which serves the scheduler; the others take each step from it over torch.distributed)."""
    enable_expert_parallel: bool = False
    """MoE layers (vLLM's --enable-expert-parallel): partition each layer's experts over the stage's tensor-parallel ranks, each rank holding whole experts and reading only its own from the checkpoint, instead of sharding every expert; tokens reach their experts' ranks and come back by all-to-all. Needs --tensor-parallel-size > 1."""
    enable_eplb: bool = False
    """Expert-parallel load balancing (vLLM's --enable-eplb): count the tokens each MoE expert gets over a sliding window and, every step_interval steps (on the scheduler's signal, at a step boundary), re-place the experts over the stage's ranks, replicating the busiest into num_redundant_experts spare slots, moving weights between ranks in place. Needs --enable-expert-parallel."""
    eplb_config: str | None = None
    """JSON object of EPLB settings (vLLM's --eplb-config): window_size (steps counted, default 1000), step_interval (steps between rebalances, 3000), num_redundant_experts (spare expert slots per MoE layer, 0), log_balancedness (log mean / max tokens per rank, false), log_balancedness_interval (steps between those lines, 1). vLLM's use_async, policy, communicator and enable_migration_batching are accepted at the values splitserve runs (synchronous, default policy) and refused otherwise."""
    pp_layer_partition: str | None = None
    """Decoder layers per pipeline rank, comma-separated, rank 0 first; they must sum to the model's layer count. None reads VLLM_PP_LAYER_PARTITION from the environment (as vLLM does), else splits evenly."""
    distributed_init_method: str | None = None
    """torch.distributed rendezvous of the pipeline ranks (tcp://host:port); None uses tcp://master_addr:master_port."""
    master_addr: str = "127.0.0.1"
    """Host of pipeline rank 0's rendezvous store, when distributed_init_method is not given."""
    master_port: int | None = None
    """Port of that store; `serve` picks a free one when neither this nor distributed_init_method is given."""
    distributed_timeout_seconds: float = 120.0
    """Longest wait for the previous rank's hidden states, or for the next rank to take this rank's, before declaring the pipeline dead (joining the group may take up to 10 minutes, while peers load)."""
    attention_backend: str = "auto"
    """Attention implementation: auto (triton on CUDA, torch otherwise), torch or triton."""
    cpu_omp_threads_bind: str = "auto"
    """CPU worker: cores its OpenMP threads are pinned to, one each: auto (on 4+ usable cores, all but one, split between the worker processes (pipeline x tensor-parallel ranks); nothing on CUDA or smaller machines), nobind, or a list such as 0-3,6. Set by the `worker` command before torch loads; ignored when OMP_PLACES or OMP_PROC_BIND is set. The in-process LLM accepts only auto or nobind (its threads are the caller's)."""
    enforce_eager: bool = False
    """Never capture CUDA graphs (CUDA only; a CPU worker always runs eagerly)."""
    max_seq_len_to_capture: int = 8192
    """CUDA only: longest context a CUDA-graph decode step covers (capped to max_model_len); a step whose longest sequence exceeds it runs eagerly."""
    cuda_graph_sizes: list[int] | None = None
    """CUDA only: decode batch sizes to capture as vLLM's --cuda-graph-sizes: one value N means 1, 2, 4 and multiples of 8 up to N, several are used as given; None: that pattern up to max_num_seqs."""
    max_cudagraph_capture_size: int | None = None
    """CUDA only: largest decode batch size captured (vLLM's --max-cudagraph-capture-size); None means 512, 0 captures nothing."""
    otlp_traces_endpoint: str | None = None
    """OTLP URL to export traces to (protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: grpc or
    http/protobuf); None exports nothing and installs no instrumentation."""
    collect_detailed_traces: str | None = None
    """Comma-separated modules to trace per step (all, model, worker; vLLM's values): the
    scheduler sends trace context with steps and the workers emit a span per step. Needs
    otlp_traces_endpoint; costly, for debugging."""
    lora_modules: list[str] | None = None
    """Adapters to serve, each name=path or vLLM's JSON form {"name": .., "path": .., "base_model_name": ..} (peft folders: adapter_config.json + adapter_model.safetensors or .bin)."""
    lora_root: str | None = None
    """Folder every adapter path must resolve inside (symlinks followed); None allows only the --lora-modules folders."""
    generation_config: str = "auto"
    """Where default sampling parameters come from (vLLM's flag): auto reads the model folder's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as the default max_tokens), vllm ignores it (splitserve's own defaults), or a folder holding a generation_config.json. They apply to the fields a request leaves unset."""
    override_generation_config: str | None = None
    """JSON object merged over those defaults (vLLM's flag), also with --generation-config vllm, e.g. '{"temperature": 0.5, "max_new_tokens": 256}'; keys: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens (null drops a default)."""
    runner: str = "auto"
    """Model runner (vLLM's --runner): generate (sampling), pooling (embeddings only: /v1/embeddings, LLM.embed), or auto (generate for every architecture splitserve loads, all *ForCausalLM)."""
    convert: str = "auto"
    """How a pooling runner adapts the model (vLLM's --convert): auto or embed, both pool the decoder LM's final hidden states into an embedding."""
    pooler_config: str | None = None
    """JSON object setting the pooler of --runner pooling (vLLM's --pooler-config): pooling_type LAST, MEAN or CLS, normalize true/false; it overrides the defaults (LAST, normalized) and a sentence-transformers modules.json in the model folder."""
    override_pooler_config: str | None = None
    """vLLM's older name of --pooler-config (same JSON); --pooler-config wins where both set a key."""

    hf_overrides: str | None = None
    """JSON object applied over the model's Hugging Face config before the model is built (vLLM's flag), e.g. '{"max_position_embeddings": 4096}' or '{"rope_scaling": {...}}'; a nested object updates a nested config."""
    ignore_patterns: list[str] | None = None
    """Files never downloaded for a hub id nor read as weights (glob patterns relative to the model folder, vLLM's flag); None means vLLM's default, original/**/* (the unconverted checkpoint some repositories carry)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        if self.guided_decoding_backend not in GUIDED_DECODING_BACKENDS:
            raise ValueError(
                f"guided_decoding_backend must be one of {', '.join(GUIDED_DECODING_BACKENDS)}, "
                f"got {self.guided_decoding_backend!r}"
            )
        self.hf_overrides = canonical_hf_overrides(self.hf_overrides)
        if self.ignore_patterns is not None and not all(self.ignore_patterns):
            raise ValueError(
                f"ignore_patterns must be non-empty globs, got {self.ignore_patterns!r}"
            )
        check_endpoint(self.otlp_traces_endpoint)
        parse_detailed_traces(self.collect_detailed_traces, self.otlp_traces_endpoint)
        choices = {
            "dtype": DTYPES,
            "device": DEVICES,
            "load_format": LOAD_FORMATS,
            "attention_backend": ATTENTION_BACKENDS,
            "kv_cache_dtype": KV_CACHE_DTYPES,
        }
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                f"got {self.quantization!r}"
            )
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be at least 1, got {self.pipeline_parallel_size}"
            )
        if not 0 <= self.rank < self.pipeline_parallel_size:
            raise ValueError(f"rank must be in [0, {self.pipeline_parallel_size}), got {self.rank}")
        if self.max_parallel_loading_workers is not None and self.max_parallel_loading_workers < 1:
            raise ValueError(
                "max_parallel_loading_workers must be at least 1, got "
                f"{self.max_parallel_loading_workers}"
            )
        self._check_pipeline_fields()
        self._check_tensor_parallel_fields()
        check_bind(self.cpu_omp_threads_bind)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        self._check_cuda_graph_fields()
        check_generation_mode(self.generation_config)
        # A dict (the in-process LLM's keyword) becomes compact JSON, as the flag carries it.
        self.override_generation_config = canonical_override(self.override_generation_config)
        self._check_pooling_fields()

    def _check_pooling_fields(self) -> None:
        check_runner_fields(self.runner, self.convert)
        resolve_runner(self.runner, self.convert)  # raises on --runner generate --convert embed
        for name in ("pooler_config", "override_pooler_config"):
            value = getattr(self, name)
            if isinstance(value, dict):  # the in-process LLM's keyword
                setattr(self, name, value := json.dumps(value, separators=(",", ":")))
            parse_pooler_config(value, name)  # raises on a malformed one
            if value is not None and self.runner == "generate":
                raise ValueError(f"{name} needs --runner pooling, but the runner is generate")

    def _check_pipeline_fields(self) -> None:
        if self.pp_layer_partition is None and os.environ.get(PP_PARTITION_ENV):
            # vLLM users set the partition in the environment; the flag wins when both are set.
            self.pp_layer_partition = os.environ[PP_PARTITION_ENV]
        self.layer_partition()  # raises on a malformed partition
        if self.distributed_timeout_seconds <= 0:
            raise ValueError(
                "distributed_timeout_seconds must be positive, got "
                f"{self.distributed_timeout_seconds}"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")
        if self.distributed_init_method is not None and "://" not in self.distributed_init_method:
            raise ValueError(
                "distributed_init_method must be a URL such as tcp://host:port, got "
                f"{self.distributed_init_method!r}"
            )

    def _check_tensor_parallel_fields(self) -> None:
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tp}")
        if not 0 <= self.tp_rank < tp:
            raise ValueError(f"tp_rank must be in [0, {tp}), got {self.tp_rank}")
        if self.enable_expert_parallel and tp == 1:
            raise ValueError(
                "--enable-expert-parallel partitions the experts over a stage's tensor-parallel "
                "ranks: it needs --tensor-parallel-size > 1"
            )
        self._check_eplb_fields()
        if tp > 1 and self.enable_lora:
            raise ValueError(
                f"--enable-lora with --tensor-parallel-size {tp}: LoRA adapters are not "
                "sharded over tensor-parallel ranks; use --tensor-parallel-size 1"
            )
        if tp > 1 and self.runner == "pooling":
            raise ValueError(
                f"--runner pooling with --tensor-parallel-size {tp}: the pooling runner runs on "
                "one rank per stage only; use --tensor-parallel-size 1"
            )

    def _check_eplb_fields(self) -> None:
        if isinstance(self.eplb_config, dict):  # the in-process LLM's keyword
            self.eplb_config = json.dumps(self.eplb_config, separators=(",", ":"))
        eplb = parse_eplb_config(self.eplb_config)
        if self.enable_eplb and not self.enable_expert_parallel:
            raise ValueError(
                "--enable-eplb balances experts over expert-parallel ranks: it needs "
                "--enable-expert-parallel (and --tensor-parallel-size > 1)"
            )
        if not self.enable_eplb and eplb.num_redundant_experts:
            raise ValueError(
                f"eplb_config num_redundant_experts is {eplb.num_redundant_experts} but EPLB is "
                "off: add --enable-eplb or drop num_redundant_experts"
            )

    @property
    def eplb(self) -> EplbConfig | None:
        """The EPLB settings when --enable-eplb is on, else None."""
        return parse_eplb_config(self.eplb_config) if self.enable_eplb else None

    @property
    def world_size(self) -> int:
        """Worker processes of the stack: pipeline stages x tensor-parallel ranks."""
        return self.pipeline_parallel_size * self.tensor_parallel_size

    def layer_partition(self) -> list[int] | None:
        """`pp_layer_partition` as one layer count per rank, or None for an even split."""
        if self.pp_layer_partition is None:
            return None
        text = str(self.pp_layer_partition)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            counts = []
        if not counts or any(c < 1 for c in counts):
            raise ValueError(
                f"pp_layer_partition must be comma-separated positive layer counts, got {text!r}"
            )
        if len(counts) != self.pipeline_parallel_size:
            raise ValueError(
                f"pp_layer_partition {text!r} has {len(counts)} entries but "
                f"pipeline_parallel_size is {self.pipeline_parallel_size}"
            )
        return counts

    def init_method(self) -> str:
        """The torch.distributed init URL of the pipeline group."""
        if self.distributed_init_method is not None:
            return self.distributed_init_method
        if self.master_port is None:
            raise ValueError(
                f"pipeline_parallel_size {self.pipeline_parallel_size} x tensor_parallel_size "
                f"{self.tensor_parallel_size} needs "
                "--distributed-init-method tcp://HOST:PORT or --master-port (and --master-addr) "
                "so the ranks can find each other"
            )
        return f"tcp://{self.master_addr}:{self.master_port}"

    def _check_cuda_graph_fields(self) -> None:
        if self.max_seq_len_to_capture < 1:
            raise ValueError(
                f"max_seq_len_to_capture must be at least 1, got {self.max_seq_len_to_capture}"
            )
        if self.max_cudagraph_capture_size is not None and self.max_cudagraph_capture_size < 0:
            raise ValueError(
                "max_cudagraph_capture_size must be non-negative, got "
                f"{self.max_cudagraph_capture_size}"
            )
        if self.cuda_graph_sizes is not None:
            # The generated CLI hands list flags over as strings.
            sizes = []
            for size in self.cuda_graph_sizes:
                try:
                    sizes.append(int(str(size)))
                except (TypeError, ValueError):
                    sizes.append(None)
            bad = [v for v, s in zip(self.cuda_graph_sizes, sizes, strict=True) if not s or s < 1]
            if bad or not sizes:
                raise ValueError(
                    f"cuda_graph_sizes must be positive integers, got {self.cuda_graph_sizes!r}"
                )
            self.cuda_graph_sizes = sizes

    def weight_ignore_patterns(self) -> list[str]:
        """The ignore patterns in force (vLLM's default when none are given)."""
        return DEFAULT_IGNORE_PATTERNS if self.ignore_patterns is None else self.ignore_patterns

    @property
    def is_first_rank(self) -> bool:
        """Whether this rank owns the token embedding."""
        return self.rank == 0

    @property
    def is_last_rank(self) -> bool:
        """Whether this rank owns the final norm and lm_head, and samples."""
        return self.rank == self.pipeline_parallel_size - 1
