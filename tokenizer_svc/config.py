"""Tokenizer service configuration: one typed dataclass; the CLI flags are generated from it."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

from splitserve.common.tracing import check_endpoint

TOKENIZER_MODES = ("auto", "slow", "fast", "mistral")
GUIDED_DECODING_BACKENDS = ("xgrammar", "guidance", "auto")

# A chat-template argument holding any of these is a template, not a file path (vLLM's rule).
_JINJA_CHARS = "{}\n"


@dataclass
class TokenizerServiceConfig:
    """Settings of the tokenizer service (vLLM's flag names where vLLM has the flag)."""

    tokenizer: str = ""
    """Tokenizer folder or hub id (required; usually the model's)."""
    revision: str | None = None
    """Hub branch, tag or commit of the model (the tokenizer's too unless tokenizer_revision is set); None takes the default branch."""
    tokenizer_revision: str | None = None
    """Hub branch, tag or commit of the tokenizer when it is a hub id; None uses revision."""
    download_dir: str | None = None
    """Folder hub models are downloaded to and looked up in; None uses the Hugging Face cache."""
    tokenizer_mode: str = "auto"
    """'auto': whatever transformers loads; 'fast': a Rust tokenizer; 'slow': a Python (sentencepiece) one; 'mistral': mistral_common's tokenizer (tekken.json / tokenizer.model.v*)."""
    trust_remote_code: bool = False
    """Allow a tokenizer class defined by Python code inside the model folder."""
    chat_template: str | None = None
    """Chat template (a file path or the template text) used instead of the model's."""
    trust_request_chat_template: bool = False
    """Accept a chat template sent in a request; off refuses such requests."""
    chat_template_timeout_s: float = 5.0
    """Longest time one chat-template render may take before it is cut off."""
    chat_template_content_format: str = "auto"
    """How the template gets message content (vLLM's flag): 'string' (text parts joined by a newline, images as the model's placeholder text), 'openai' (a list of {"type": "text"} / {"type": "image"} parts), or 'auto' ('openai' when the template loops over message['content'])."""
    max_stop_strings: int = 64
    """Most stop strings one sequence may carry."""
    tokenizer_threads: int = 4
    """Threads for tokenization and template rendering (the event loop stays free)."""
    shutdown_grace_s: float = 5.0
    """Seconds in-flight RPCs get to finish after SIGTERM."""
    otlp_traces_endpoint: str | None = None
    """OTLP URL to export traces to (protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: grpc or
    http/protobuf); None exports nothing and installs no instrumentation."""
    guided_decoding_backend: str = "auto"
    """Structured-output backend when a request names none (vLLM's default, auto): auto (xgrammar where it enforces the constraint exactly, else guidance; refused only when neither does), xgrammar or guidance."""
    grammar_cache_size: int = 256
    """Compiled constraints kept (LRU by SHA-256 of backend, kind and text); 0 disables."""
    grammar_compile_timeout_s: float = 30.0
    """Longest one constraint compile may take before the request fails with DEADLINE_EXCEEDED."""
    grammar_compile_threads: int = 2
    """Threads compiling constraints."""
    grammar_max_pending: int = 16
    """Compiles running or queued past which new ones are refused with RESOURCE_EXHAUSTED."""
    lora_root: str | None = None
    """Folder every LoRA adapter path must resolve inside (symlinks followed), for adapters with their own tokenizer (added tokens); None allows only the --lora-modules folders."""
    lora_modules: list[str] | None = None
    """LoRA adapters served, as name=path or vLLM's JSON form: their folders are where adapter tokenizers may be read from when --lora-root is not given."""
    limit_mm_per_prompt: str | None = None
    """Most multimodal items one prompt may carry, per modality, as JSON (vLLM's flag), e.g. '{"image": 2, "audio": 1}'; each defaults to 4 (vLLM: 999). Only models that take a modality accept any of it."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width times height, read from its header before decoding) a request may carry."""
    max_audio_seconds: float = 600.0
    """Longest audio item a prompt may carry, in seconds after decoding (a 400 naming the part past it); its encoded file may hold at most 25 MB, as OpenAI's uploads."""
    mm_processor_cache_gb: float = 4.0
    """GiB of processed images kept by the SHA-256 of their files (vLLM's flag), so a repeated image skips decoding and the image processor; 0 disables. (The encoder's outputs are cached by the scheduler: --encoder-cache-size.)"""
    disable_mm_preprocessor_cache: bool = False
    """No preprocessor cache (vLLM's older flag; the same as --mm-processor-cache-gb 0)."""

    structured_outputs_config: str | None = None
    """vLLM's --structured-outputs-config JSON, mapped onto these flags: backend sets --guided-decoding-backend; disable_fallback true needs a named backend (splitserve never falls back from one); disable_any_whitespace, disable_additional_properties, reasoning_parser (use the gateway's --reasoning-parser), reasoning_parser_plugin and enable_in_reasoning are accepted only at their defaults; other keys are refused."""

    def __post_init__(self) -> None:
        check_endpoint(self.otlp_traces_endpoint)
        self._apply_structured_outputs_config()
        if not self.tokenizer:
            raise ValueError(f"tokenizer must name a folder or hub id, got {self.tokenizer!r}")
        if self.tokenizer_mode not in TOKENIZER_MODES:
            raise ValueError(
                f"tokenizer_mode must be one of {', '.join(TOKENIZER_MODES)}, "
                f"got {self.tokenizer_mode!r}"
            )
        if self.tokenizer_mode == "mistral" and importlib.util.find_spec("mistral_common") is None:
            raise ValueError(
                "tokenizer_mode 'mistral' needs the mistral_common package, which is not "
                "installed: pip install mistral-common"
            )
        if self.chat_template is not None:
            load_chat_template(self.chat_template)  # raises on an unreadable path
        if self.chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                "chat_template_content_format must be one of auto, string, openai, got "
                f"{self.chat_template_content_format!r}"
            )
        if not self.chat_template_timeout_s > 0:
            raise ValueError(
                f"chat_template_timeout_s must be > 0, got {self.chat_template_timeout_s}"
            )
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if self.tokenizer_threads < 1:
            raise ValueError(f"tokenizer_threads must be >= 1, got {self.tokenizer_threads}")
        if self.guided_decoding_backend not in GUIDED_DECODING_BACKENDS:
            raise ValueError(
                "guided_decoding_backend must be one of "
                f"{', '.join(GUIDED_DECODING_BACKENDS)}, got {self.guided_decoding_backend!r}"
            )
        if self.grammar_cache_size < 0:
            raise ValueError(f"grammar_cache_size must be >= 0, got {self.grammar_cache_size}")
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(
                f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s}"
            )
        if self.grammar_compile_threads < 1:
            raise ValueError(
                f"grammar_compile_threads must be >= 1, got {self.grammar_compile_threads}"
            )
        if self.grammar_max_pending < 1:
            raise ValueError(f"grammar_max_pending must be >= 1, got {self.grammar_max_pending}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        from splitserve.common.mm_limits import canonical_mm_limits

        if not self.mm_processor_cache_gb >= 0:
            raise ValueError(
                f"mm_processor_cache_gb must be >= 0, got {self.mm_processor_cache_gb}"
            )
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be positive, got {self.max_audio_seconds}")

        # A dict (the in-process LLM's keyword) becomes compact JSON, as the flag carries it.
        self.limit_mm_per_prompt = canonical_mm_limits(self.limit_mm_per_prompt)

    def _apply_structured_outputs_config(self) -> None:
        if self.structured_outputs_config is None:
            return
        value = self.structured_outputs_config
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"--structured-outputs-config is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(
                f"--structured-outputs-config must be a JSON object, got {type(value).__name__}"
            )
        unknown = sorted(set(value) - set(_SO_DEFAULTS) - {"backend", "disable_fallback"})
        if unknown:
            raise ValueError(
                f"--structured-outputs-config: unknown key(s) {', '.join(unknown)}; known: "
                f"backend, disable_fallback, {', '.join(_SO_DEFAULTS)}"
            )
        for key, (default, why) in _SO_DEFAULTS.items():
            if key in value and value[key] != default:
                raise ValueError(
                    f"--structured-outputs-config {key}={value[key]!r}: {why} (only "
                    f"{default!r} is accepted)"
                )
        backend = value.get("backend")
        if backend is not None:
            if backend not in GUIDED_DECODING_BACKENDS:
                raise ValueError(
                    f"--structured-outputs-config backend={backend!r}: splitserve has "
                    f"{', '.join(GUIDED_DECODING_BACKENDS)}"
                )
            default = _default_backend()
            if self.guided_decoding_backend not in (default, backend):
                raise ValueError(
                    f"--structured-outputs-config backend={backend!r} contradicts "
                    f"--guided-decoding-backend {self.guided_decoding_backend}; give one"
                )
            self.guided_decoding_backend = backend
        if value.get("disable_fallback") and self.guided_decoding_backend == "auto":
            raise ValueError(
                "--structured-outputs-config disable_fallback=true needs a named backend "
                "(xgrammar or guidance): only auto chooses between backends"
            )
        self.structured_outputs_config = json.dumps(value, sort_keys=True)


# Server-wide structured-output settings splitserve takes only at vLLM's default, and why.
_SO_DEFAULTS = {
    "disable_any_whitespace": (
        False,
        "not supported server-wide; a request may give structured_outputs.whitespace_pattern",
    ),
    "disable_additional_properties": (
        False,
        "set it per request in structured_outputs.disable_additional_properties",
    ),
    "reasoning_parser": ("", "use the gateway's --reasoning-parser"),
    "reasoning_parser_plugin": ("", "splitserve loads no parser plugins"),
    "enable_in_reasoning": (False, "constraints always apply to the whole output"),
}


def _default_backend() -> str:
    from dataclasses import fields

    return next(
        f.default for f in fields(TokenizerServiceConfig) if f.name == "guided_decoding_backend"
    )


def mm_cache_bytes(config: TokenizerServiceConfig) -> int:
    """Bytes of the preprocessor cache (0: none)."""
    if config.disable_mm_preprocessor_cache:
        return 0
    return int(config.mm_processor_cache_gb * (1 << 30))


def load_chat_template(value: str) -> str:
    """Return the template text of a `--chat-template` argument: a file's contents or the text.

    Like vLLM: text with braces or a newline is a template; anything else must be a readable
    file, and a path that cannot be read is an error rather than a one-line template.
    """
    if any(c in value for c in _JINJA_CHARS):
        return value
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(
            f"chat_template {value!r} is not a template and cannot be read as a file: {exc}"
        ) from exc
