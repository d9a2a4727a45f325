"""Default sampling parameters from a model's generation_config.json (vLLM's --generation-config
and --override-generation-config).

The worker, which has the model folder, resolves them at load time and reports them in its
Describe answer; the scheduler passes them on in ModelInfo; the gateway and the in-process `LLM`
apply them to the fields a request leaves unset. Torch-free: the gateway imports it.

As in vLLM, six keys count: temperature, top_p, top_k, min_p, repetition_penalty and
max_new_tokens (which becomes the default max_tokens). Other keys of the file (eos_token_id,
do_sample, ...) are ignored here; like vLLM, `do_sample: false` does not make sampling greedy.
Like vLLM (which reads the file through transformers' `GenerationConfig.to_diff_dict()`), a file
value equal to transformers' own default (temperature 1.0, top_p 1.0, top_k 50,
repetition_penalty 1.0) is not taken; an override is always taken.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
MODES = ("auto", "vllm")
"""--generation-config values other than a folder."""

_FLOAT_KEYS = ("temperature", "top_p", "min_p", "repetition_penalty")
_INT_KEYS = ("top_k", "max_new_tokens")
KEYS = (*_FLOAT_KEYS, *_INT_KEYS)
"""The generation_config.json keys that become default sampling parameters."""

_TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
"""transformers' GenerationConfig defaults; a file value equal to one is not taken (as vLLM)."""

BUILTIN = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
"""splitserve's own defaults for the same fields (max_tokens has none: per endpoint)."""

_OVERRIDE_SOURCE = "--override-generation-config"


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Defaults for the sampling fields a request leaves unset; None keeps splitserve's own."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """generation_config.json's max_new_tokens (still capped by what the context leaves)."""

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, by SamplingParams name."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def changed(self) -> dict[str, Any]:
        """The set fields whose value differs from splitserve's own default."""
        out = {}
        for key, value in self.as_dict().items():
            builtin = BUILTIN.get(key)
            if key == "top_k" and value == -1:
                value = 0  # -1 and 0 both disable top-k
            if builtin is None or value != builtin:
                out[key] = value
        return out

    def to_proto(self):
        from splitserve.protos import common_pb2

        return common_pb2.SamplingDefaults(**self.as_dict())

    @classmethod
    def from_proto(cls, proto) -> SamplingDefaults:
        """From a SamplingDefaults message, range-checked (ValueError names the bad field)."""
        values = {f.name: getattr(proto, f.name) for f in fields(cls) if proto.HasField(f.name)}
        if "max_tokens" in values:
            values["max_new_tokens"] = values.pop("max_tokens")
        for key, value in values.items():
            _check_range(key, value, "the reported default sampling parameters")
        return _from_hf(values)

    def warn_if_changed(self, log: logging.Logger = logger) -> None:
        """One start-up warning naming the defaults that differ from splitserve's own."""
        changed = self.changed()
        if changed:
            shown = ", ".join(f"{k}={v}" for k, v in changed.items())
            log.warning(
                "Default sampling parameters come from the model's generation config (%s); "
                "requests that leave these fields unset use them. To use splitserve's own "
                "defaults instead, start with `--generation-config vllm`.",
                shown,
            )


def _from_hf(values: dict[str, Any]) -> SamplingDefaults:
    values = {k: v for k, v in values.items() if v is not None}
    if "max_new_tokens" in values:
        values["max_tokens"] = values.pop("max_new_tokens")
    return SamplingDefaults(**values)


def check_mode(mode: str) -> None:
    """--generation-config must be auto, vllm, or a folder holding generation_config.json."""
    if mode in MODES:
        return
    folder = pathlib.Path(mode).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"generation_config must be 'auto', 'vllm' or a folder holding {FILE_NAME}, got "
            f"{mode!r} (no such folder)"
        )
    if not (folder / FILE_NAME).is_file():
        raise ValueError(f"generation_config folder {mode!r} has no {FILE_NAME}")


def parse_override(override: str | dict | None) -> dict[str, Any]:
    """The --override-generation-config JSON object as a dict of checked values (a null value
    drops that key's default). ValueError names an unknown key, a wrong type or a bad value."""
    if override is None:
        return {}
    if isinstance(override, str):
        try:
            value = json.loads(override)
        except ValueError as exc:
            raise ValueError(
                f"override_generation_config must be a JSON object, e.g. "
                f"'{{\"temperature\": 0.5}}'; {override!r} is not valid JSON: {exc}"
            ) from None
    else:
        value = override
    if not isinstance(value, dict):
        raise ValueError(
            f"override_generation_config must be a JSON object, got {type(value).__name__} "
            f"{value!r}"
        )
    return _checked(value, _OVERRIDE_SOURCE, strict_keys=True)


def canonical_override(override: str | dict | None) -> str | None:
    """The override as compact JSON (so it passes to a child process as one flag)."""
    values = parse_override(override)
    return json.dumps(values, sort_keys=True) if override is not None else None


def read_file(path: pathlib.Path) -> dict[str, Any]:
    """The sampling keys of one generation_config.json, checked; values equal to transformers'
    defaults are left out, as vLLM does."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    values = _checked(raw, str(path), strict_keys=False)
    return {
        k: v
        for k, v in values.items()
        if v is not None and not (k in _TRANSFORMERS_DEFAULTS and v == _TRANSFORMERS_DEFAULTS[k])
    }


def resolve(mode: str, model_folder: pathlib.Path | None, override: str | dict | None):
    """The SamplingDefaults for --generation-config `mode` (auto: the model folder's file, if
    any; vllm: none; a folder: its file) with `override` merged on top."""
    check_mode(mode)
    if mode == "vllm":
        base: dict[str, Any] = {}
    else:
        folder = model_folder if mode == "auto" else pathlib.Path(mode).expanduser()
        file = folder / FILE_NAME if folder is not None else None
        base = read_file(file) if file is not None and file.is_file() else {}
    return _from_hf({**base, **parse_override(override)})


def _checked(raw: dict, source: str, strict_keys: bool) -> dict[str, Any]:
    if strict_keys:
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            hint = (
                " (generation_config.json calls it max_new_tokens)" if "max_tokens" in raw else ""
            )
            raise ValueError(
                f"{source}: unknown key(s) {unknown}{hint}; allowed: {', '.join(KEYS)}"
            )
    out: dict[str, Any] = {}
    for key in KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if value is None:
            out[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"{source}: {key} must be a number, got {type(value).__name__} {value!r}"
            )
        if key in _INT_KEYS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        _check_range(key, value, source)
        out[key] = value
    return out


def _check_range(key: str, value: float | int, source: str) -> None:
    ok, rule = {
        "temperature": (math.isfinite(value) and value >= 0, "a finite number >= 0"),
        "top_p": (0 < value <= 1, "in (0, 1]"),
        "top_k": (value >= -1, "-1 (disable), 0 (disable) or at least 1"),
        "min_p": (0 <= value <= 1, "in [0, 1]"),
        "repetition_penalty": (math.isfinite(value) and value > 0, "a finite number > 0"),
        "max_new_tokens": (value >= 1, "at least 1"),
    }[key]
    if not ok:
        raise ValueError(f"{source}: {key} must be {rule}, got {value!r}")
