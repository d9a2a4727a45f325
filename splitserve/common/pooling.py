"""Pooling runner settings (vLLM's --runner, --convert, --pooler-config) and embedding
post-processing. No torch: the worker, the scheduler and the gateway all read this.

A decoder LM served with `--runner pooling` (`--convert embed`) answers /v1/embeddings: a
request is prompt-only, its hidden states after the final norm are pooled on the last
pipeline rank (LAST, MEAN or CLS), then truncated to the request's `dimensions` (matryoshka
models only) and L2-normalized when the pooler says so.

Defaults as vLLM's: LAST pooling with normalization, unless the model folder holds a
sentence-transformers pooling config (modules.json -> the Pooling module's config.json, plus a
Normalize module or not); --pooler-config overrides both, key by key.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "embed")
POOLING_TYPES = ("LAST", "MEAN", "CLS")
_POOLER_KEYS = {"pooling_type", "normalize"}
# sentence-transformers Pooling config keys -> our pooling type (first true one wins).
_ST_MODES = (
    ("pooling_mode_lasttoken", "LAST"),
    ("pooling_mode_mean_tokens", "MEAN"),
    ("pooling_mode_cls_token", "CLS"),
)
_ST_UNSUPPORTED = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)
# sentence-transformers modules whose effect splitserve reproduces (the rest are refused, not
# skipped: a Dense projection left out would give wrong vectors without a word).
_ST_MODULES = (".Transformer", ".Pooling", ".Normalize")


def check_runner_fields(runner: str, convert: str) -> None:
    """Range checks of --runner and --convert (the WorkerConfig's __post_init__ calls it)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(
            f"convert must be one of {', '.join(CONVERTS)} (splitserve converts decoder LMs to "
            f"embedding models only), got {convert!r}"
        )


def parse_pooler_config(text: str | None, flag: str = "pooler_config") -> dict[str, Any]:
    """The JSON object of --pooler-config, checked: pooling_type LAST|MEAN|CLS, normalize."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    unknown = sorted(set(value) - _POOLER_KEYS)
    if unknown:
        raise ValueError(
            f"{flag} has unsupported key(s) {unknown}; supported: {sorted(_POOLER_KEYS)}"
        )
    out: dict[str, Any] = {}
    if value.get("pooling_type") is not None:
        ptype = str(value["pooling_type"]).upper()
        if ptype not in POOLING_TYPES:
            raise ValueError(
                f"{flag}: pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                f"got {value['pooling_type']!r}"
            )
        out["pooling_type"] = ptype
    if value.get("normalize") is not None:
        if not isinstance(value["normalize"], bool):
            raise ValueError(f"{flag}: normalize must be true or false, got {value['normalize']!r}")
        out["normalize"] = value["normalize"]
    return out


def read_sentence_transformers_pooling(folder: pathlib.Path) -> dict[str, Any]:
    """Pooling type and normalization from a sentence-transformers folder (modules.json);
    empty when the folder has none. A pooling mode splitserve lacks is named under
    "unsupported" (an error unless --pooler-config sets pooling_type)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    out: dict[str, Any] = {}
    types = [str(m.get("type", "")) for m in modules]
    others = [t for t in types if not t.endswith(_ST_MODULES)]
    if others:
        raise ValueError(
            f"{modules_file}: sentence-transformers module(s) {others} are not supported "
            "(splitserve applies Transformer, Pooling and Normalize only)"
        )
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if pooling:
        config_file = folder / str(pooling[0].get("path", "")) / "config.json"
        if config_file.is_file():
            st = json.loads(config_file.read_text())
            if st.get("include_prompt") is False:
                raise ValueError(
                    f"{config_file}: include_prompt false (pooling that skips the instruction "
                    "tokens) is not supported"
                )
            for key, ptype in _ST_MODES:
                if st.get(key):
                    out["pooling_type"] = ptype
                    break
            else:
                used = [k for k in _ST_UNSUPPORTED if st.get(k)]
                if used:
                    out["unsupported"] = f"{config_file}: sentence-transformers pooling {used}"
    out["normalize"] = any(t.endswith(".Normalize") for t in types)
    return out


@dataclass(frozen=True, slots=True)
class PoolerSettings:
    """How a pooling model turns hidden states into one vector."""

    pooling_type: str = "LAST"
    normalize: bool = True


BASE_MODEL_ARCHITECTURES = {
    "LlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
}
"""Bare decoders (checkpoints saved from AutoModel, e.g. e5-mistral's MistralModel): splitserve
runs them with its *ForCausalLM class, as embedding models (vLLM's --convert embed)."""


def is_base_model(architectures: list[str] | None) -> bool:
    """Whether the checkpoint is a bare decoder (its first architecture is a *Model)."""
    return bool(architectures) and architectures[0] in BASE_MODEL_ARCHITECTURES


def resolve_runner(runner: str, convert: str, architectures: list[str] | None = None) -> str:
    """ "generate" or "pooling". --convert embed implies pooling; so does auto for a bare
    decoder (*Model, as vLLM decides); otherwise auto means generate (a *ForCausalLM)."""
    if convert == "embed" or is_base_model(architectures):
        if runner == "generate":
            why = "--convert embed" if convert == "embed" else f"architecture {architectures[0]}"
            raise ValueError(f"{why} makes a pooling model: it needs --runner pooling (or auto)")
        return "pooling"
    return "generate" if runner == "auto" else runner


def check_runner(config: Any, architectures: list[str] | None) -> str:
    """The runner a worker config resolves to for these architectures; pooler flags with a
    generate runner are an error (a flag must not be parsed and ignored)."""
    runner = resolve_runner(config.runner, config.convert, architectures)
    for name in ("pooler_config", "override_pooler_config"):
        if getattr(config, name) is not None and runner != "pooling":
            raise ValueError(
                f"{name} needs --runner pooling, but the runner is generate "
                f"(--runner {config.runner})"
            )
    return runner


def resolve_pooler(
    folder: pathlib.Path, pooler_config: str | None, override_pooler_config: str | None
) -> PoolerSettings:
    """Defaults (LAST, normalize), then the folder's sentence-transformers config, then the
    flags (--override-pooler-config is vLLM's older name of --pooler-config)."""
    flags = parse_pooler_config(override_pooler_config, "override_pooler_config")
    flags.update(parse_pooler_config(pooler_config))
    st = read_sentence_transformers_pooling(folder)
    if "unsupported" in st and "pooling_type" not in flags:
        raise ValueError(
            f"{st['unsupported']} is not supported (splitserve pools "
            f"{', '.join(POOLING_TYPES)}); choose one with --pooler-config"
        )
    values: dict[str, Any] = {"pooling_type": "LAST", "normalize": True, **st, **flags}
    return PoolerSettings(values["pooling_type"], values["normalize"])


def matryoshka_dimensions(hf_config: Any) -> tuple[bool, list[int]]:
    """(supports matryoshka, the allowed dimensions or [] for any) from the model config, as
    vLLM reads it: `matryoshka_dimensions` (a list) or `is_matryoshka` (a bool)."""
    dims = list(getattr(hf_config, "matryoshka_dimensions", None) or [])
    return bool(dims) or bool(getattr(hf_config, "is_matryoshka", False)), [int(d) for d in dims]


def dimensions_problem(
    dimensions: int, model: str, is_matryoshka: bool, allowed: list[int], hidden_size: int
) -> str | None:
    """Why a request's `dimensions` is refused, or None (the rules of vLLM's embeddings API).
    `model` names the model in the message ("Model 'x'")."""
    if not is_matryoshka:
        return (
            f"{model} does not support matryoshka representation, changing output "
            "dimensions will lead to poor results"
        )
    if dimensions < 1:
        return f"dimensions must be at least 1, got {dimensions}"
    if allowed and dimensions not in allowed:
        return f"{model} only supports {allowed} matryoshka dimensions, got {dimensions}"
    if hidden_size and dimensions > hidden_size:
        return f"dimensions ({dimensions}) exceeds the model's hidden size ({hidden_size})"
    return None


def finish_embedding(pooled: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Truncate a pooled vector to `dimensions` (matryoshka), then L2-normalize if asked."""
    out = np.asarray(pooled, dtype=np.float32)
    if dimensions:
        out = out[:dimensions]
    if normalize:
        norm = float(np.sqrt(np.dot(out.astype(np.float64), out.astype(np.float64))))
        out = out / max(norm, 1e-12)
    return out.astype(np.float32)
