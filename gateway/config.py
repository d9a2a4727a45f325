"""The gateway's configuration: one dataclass, from which the CLI is generated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from splitserve.common import engine_config
from splitserve.common.engine_config import engine_fields
from splitserve.common.lora import check_lora_fields
from splitserve.common.tracing import check_endpoint
from splitserve.gateway.reasoning import REASONING_PARSERS
from splitserve.gateway.tool_parsers import TOOL_PARSERS


@dataclass
class GatewayConfig(
    engine_fields("max_logprobs", "enable_lora", "max_lora_rank", "lora_extra_vocab_size")
):
    """How the HTTP gateway listens, where its services are, and the limits it enforces; the
    engine fields it shares with the scheduler and the workers are declared in
    splitserve.common.engine_config."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = 8000
    """Port the HTTP server binds (0 picks a free one)."""
    scheduler_address: str = "127.0.0.1:50052"
    """gRPC address of the scheduler service (host:port or unix:path)."""
    tokenizer_address: str = "127.0.0.1:50051"
    """gRPC address of the tokenizer service (host:port or unix:path)."""
    model: str = ""
    """Model folder or hub id, for display; empty takes the one the scheduler reports."""
    served_model_name: list[str] | None = None
    """Model names clients may ask for; the first is reported in responses (default: model)."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but the probes (/health, /ping, /version) needs `Authorization:
    Bearer <key>` (vLLM guards only /v1/*); else the SPLITSERVE_API_KEY or VLLM_API_KEY
    environment variable, when set."""
    disable_metrics_auth: bool = False
    """With an API key: serve /metrics without it, for Prometheus scrapers that send none."""
    max_n: int = 128
    """Most sequences one request may run: `n`, times the prompts of a completions batch."""
    max_stop_strings: int = 64
    """Most stop strings a request may give."""
    max_stop_string_chars: int = 1024
    """Longest stop string a request may give, in characters."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted; bigger bodies get 413."""
    request_timeout_s: float | None = None
    """Deadline of each request's gRPC calls in seconds (exceeded: 504); None for none."""
    max_tokens_default: int = 16
    """max_tokens of a completion request that gives none (chat uses the rest of the context); the model's max_new_tokens, when its generation config sets one, caps it and every explicit max_tokens too, as in vLLM."""
    rpc_timeout_s: float = 60.0
    """Longest wait on the scheduler or the tokenizer service: the deadline of every unary
    call to them (within the request's own), and the longest silence of the scheduler's
    output stream (it sends heartbeats) before the gateway takes the scheduler as stalled
    and fails every request on it. Either way the client gets a 503 (an SSE error event
    once streaming) and /health is 503 while the service stays silent."""
    retry_after_s: int = 1
    """Seconds put in Retry-After when the scheduler's queue is full (503)."""
    startup_timeout_s: float = 600.0
    """How long start-up waits for the scheduler and tokenizer services to answer."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may still run (health and new requests
    get 503 meanwhile) before they are cancelled and the gateway exits."""
    root_path: str = ""
    """ASGI root_path, when the gateway sits behind a path-based proxy."""
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    """CORS allowed origins."""
    allow_credentials: bool = False
    """CORS: allow credentials."""
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    """CORS allowed methods."""
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    """CORS allowed headers."""
    uvicorn_log_level: str = "info"
    """Log level of uvicorn's own loggers."""
    otlp_traces_endpoint: str | None = None
    """OTLP URL to export traces to (protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: grpc or
    http/protobuf); None exports nothing and installs no instrumentation."""
    enable_prompt_tokens_details: bool = False
    """Report usage.prompt_tokens_details.cached_tokens: prompt tokens served from the prefix cache (vLLM's flag)."""
    return_tokens_as_token_ids: bool = False
    """Logprob tokens as strings "token_id:N" (requests may override with
    return_tokens_as_token_ids), for tokens that do not decode to text on their own."""
    lora_modules: list[str] | None = None
    """Adapters to serve, each name=path or vLLM's JSON form {"name": .., "path": .., "base_model_name": ..} (peft folders: adapter_config.json + adapter_model.safetensors or .bin)."""
    lora_root: str | None = None
    """Folder every adapter path must resolve inside (symlinks followed); None allows only the --lora-modules folders."""
    enable_auto_tool_choice: bool = False
    """Let chat requests use tool_choice "auto" (the default with tools): the output is read for tool calls by --tool-call-parser (vLLM's flag)."""
    tool_call_parser: str | None = None
    """How tool calls are written in the model's output, for --enable-auto-tool-choice: hermes (Qwen2.5/Qwen3, Hermes), llama3_json (Llama 3.1+), mistral."""
    reasoning_parser: str | None = None
    """Split chat output's <think> text into the message's reasoning (and reasoning_content) field: deepseek_r1 (the template opens <think>) or qwen3."""
    limit_mm_per_prompt: str | None = None
    """Most multimodal items one prompt may carry, per modality, as JSON (vLLM's flag), e.g. '{"image": 2, "audio": 1}'; each defaults to 4 (vLLM: 999). Only models that take a modality accept any of it."""
    allowed_media_domains: list[str] | None = None
    """Hosts chat image_url parts may be fetched from over http(s) (vLLM's flag); None: no remote fetch (data: URLs always work). Hosts must resolve to public addresses only."""
    allowed_local_media_path: str | None = None
    """Folder chat image_url parts may read file:// images from, symlinks followed (vLLM's flag); None: no local files."""
    max_image_bytes: int = 10 << 20
    """Largest image file a chat request may carry (a data: URL's decoded bytes, a fetched or local file)."""
    media_fetch_timeout_s: float = 5.0
    """Longest time fetching one image over http(s) may take, redirects included."""

    enable_log_requests: bool = False
    """Log each generation request as it arrives (vLLM's flag): its id, prompt text and token ids (cut to --max-log-len), sampling parameters and adapter."""
    disable_log_requests: bool = False
    """vLLM's older spelling, kept for old scripts: request logging is already off unless --enable-log-requests is given; giving both is an error."""
    max_log_len: int | None = None
    """Most prompt characters and prompt token ids a request log line shows; None shows all."""
    disable_uvicorn_access_log: bool = False
    """Do not log one line per HTTP request (uvicorn's access log)."""
    disable_fastapi_docs: bool = False
    """Serve no /docs, /redoc or /openapi.json."""
    response_role: str = "assistant"
    """Role of the chat response's message when the request's add_generation_prompt is true (otherwise the last message's role, as in vLLM)."""
    ssl_keyfile: str | None = None
    """TLS private key file (PEM); with ssl_certfile the gateway serves HTTPS."""
    ssl_certfile: str | None = None
    """TLS certificate chain file (PEM); with ssl_keyfile the gateway serves HTTPS."""
    ssl_ca_certs: str | None = None
    """CA certificates (PEM) that client certificates are checked against."""
    ssl_cert_reqs: int = 0
    """Whether clients must present a certificate (Python's ssl.VerifyMode): 0 none, 1 optional, 2 required (with ssl_ca_certs)."""
    enable_request_id_headers: bool = False
    """Put an X-Request-Id header on every response: the request's own X-Request-Id when it sends a well-formed one, else a new random id."""
    enable_server_load_tracking: bool = False
    """Count completions and chat requests in flight and serve the count at GET /load as {"server_load": N} (vLLM's flag)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields(self)
        self._check_media()
        self._check_parsers()
        self._check_frontend_fields()
        check_endpoint(self.otlp_traces_endpoint)
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("scheduler_address", "tokenizer_address"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty, got {getattr(self, name)!r}")
        if self.served_model_name is not None and (
            not self.served_model_name or not all(self.served_model_name)
        ):
            raise ValueError(
                f"served_model_name must hold non-empty names, got {self.served_model_name!r}"
            )
        if self.api_key is not None and not self.api_key:
            # NOTE: never echo the key itself.
            raise ValueError("api_key must not be empty when set")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be non-negative, got {self.max_stop_strings}")
        if self.max_stop_string_chars < 1:
            raise ValueError(
                f"max_stop_string_chars must be at least 1, got {self.max_stop_string_chars}"
            )
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(
                f"request_timeout_s must be positive or None, got {self.request_timeout_s}"
            )
        if self.max_tokens_default < 1:
            raise ValueError(
                f"max_tokens_default must be at least 1, got {self.max_tokens_default}"
            )
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"rpc_timeout_s must be positive, got {self.rpc_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be non-negative, got {self.retry_after_s}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be non-negative, got {self.drain_timeout_s}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(
                f"root_path must start with '/' and not end with one, got {self.root_path!r}"
            )

    def _check_frontend_fields(self) -> None:
        if self.enable_log_requests and self.disable_log_requests:
            raise ValueError(
                "--enable-log-requests and --disable-log-requests contradict each other; "
                "give one (request logging is off by default)"
            )
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be non-negative or None, got {self.max_log_len}")
        if not self.response_role:
            raise ValueError("response_role must not be empty")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError(
                "--ssl-keyfile and --ssl-certfile go together, got "
                f"ssl_keyfile={self.ssl_keyfile!r}, ssl_certfile={self.ssl_certfile!r}"
            )
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name} {path!r} is not a readable file")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ValueError(
                f"ssl_cert_reqs must be 0 (none), 1 (optional) or 2 (required), "
                f"got {self.ssl_cert_reqs}"
            )
        if self.ssl_cert_reqs and self.ssl_certfile is None:
            raise ValueError("ssl_cert_reqs needs TLS: give --ssl-keyfile and --ssl-certfile")
        if self.ssl_cert_reqs == 2 and self.ssl_ca_certs is None:
            raise ValueError(
                "ssl_cert_reqs 2 (client certificates required) needs --ssl-ca-certs to check "
                "them against"
            )

    def _check_parsers(self) -> None:
        for name, known in (
            ("tool_call_parser", TOOL_PARSERS),
            ("reasoning_parser", REASONING_PARSERS),
        ):
            value = getattr(self, name)
            if value is not None and value not in known:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} is not a known parser; "
                    f"known: {', '.join(sorted(known))}"
                )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "--enable-auto-tool-choice needs --tool-call-parser NAME (known: "
                f"{', '.join(sorted(TOOL_PARSERS))})"
            )
        if self.tool_call_parser is not None and not self.enable_auto_tool_choice:
            raise ValueError(
                f"--tool-call-parser {self.tool_call_parser} is used only with "
                "--enable-auto-tool-choice; add that flag"
            )

    def _check_media(self) -> None:
        from splitserve.common.mm_limits import canonical_mm_limits

        self.limit_mm_per_prompt = canonical_mm_limits(self.limit_mm_per_prompt)
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if not self.media_fetch_timeout_s > 0:
            raise ValueError(f"media_fetch_timeout_s must be > 0, got {self.media_fetch_timeout_s}")
        if self.allowed_media_domains is not None:
            if isinstance(self.allowed_media_domains, str):
                self.allowed_media_domains = [self.allowed_media_domains]
            bad = [d for d in self.allowed_media_domains if not d or "/" in d or ":" in d]
            if bad:
                raise ValueError(
                    f"allowed_media_domains must be bare host names, got {bad} "
                    "(no scheme, port or path)"
                )
        if self.allowed_local_media_path is not None and not os.path.isdir(
            self.allowed_local_media_path
        ):
            raise ValueError(
                f"allowed_local_media_path {self.allowed_local_media_path!r} is not a folder"
            )

    def agree_with_engine(self, engine) -> None:
        """Check this gateway's engine fields against the scheduler's (ModelInfo.engine, all
        in use there) and take its values for those left at their defaults. Raises
        EngineConfigConflict naming the field and both values."""
        # NOTE: enable_lora and max_lora_rank are fixed: the adapter registry was built with
        # them (--lora-modules adapters already checked against the rank limit).
        own = engine_config.engine_values(
            self, "gateway", also_fixed=frozenset({"enable_lora", "max_lora_rank"})
        )
        theirs = engine_config.from_proto(engine, "scheduler").all_fixed()
        engine_config.adopt(self, engine_config.agree(own, theirs))

    def model_names(self, reported_model: str = "") -> list[str]:
        """The names clients may use, first one reported; falls back to the model path."""
        if self.served_model_name:
            return list(self.served_model_name)
        return [self.model or reported_model or "default"]
