"""--hf-overrides: a JSON object applied over the model's Hugging Face config (vLLM's flag).

The worker applies it when it builds its model and `splitserve serve` when it checks the model
before starting anything, through the same function, so both see one config. A key whose
value is an object and whose current value is a nested config (text_config, rope_scaling as a
dict, ...) is merged into it; any other key is set as given.
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.common.json_object import json_object


def parse_hf_overrides(value: str | dict | None) -> dict[str, Any]:
    """The overrides as a dict; a ValueError names what is wrong."""
    return {} if value is None else json_object(value, "hf_overrides")


def canonical_hf_overrides(value: str | dict | None) -> str | None:
    """Compact JSON (one flag value for a child process), or None when unset."""
    return None if value is None else json.dumps(parse_hf_overrides(value), sort_keys=True)


def _merge(current: Any, update: dict[str, Any]) -> Any:
    if isinstance(current, dict):
        return {**current, **update}
    for key, value in update.items():
        sub = getattr(current, key, None)
        if isinstance(value, dict) and sub is not None and not isinstance(sub, dict):
            _merge(sub, value)
        elif isinstance(value, dict) and isinstance(sub, dict):
            setattr(current, key, {**sub, **value})
        else:
            setattr(current, key, value)
    return current


def apply_hf_overrides(raw: dict[str, Any], hf_config: Any, value: str | dict | None) -> None:
    """Apply the overrides to the raw config.json dict and the transformers config alike."""
    overrides = parse_hf_overrides(value)
    for key, update in overrides.items():
        if isinstance(update, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **update}
        else:
            raw[key] = update
    _merge(hf_config, overrides)
