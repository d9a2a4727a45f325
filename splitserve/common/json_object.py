"""A flag whose value is a JSON object (vLLM's `--hf-overrides '{...}'`, `--eplb-config '{...}'`),
given as its JSON text on the command line or as a dict by the in-process LLM."""

from __future__ import annotations

import json
from typing import Any


def json_object(value: str | dict, what: str) -> dict[str, Any]:
    """`value` as a dict; a ValueError naming `what` when it is not JSON or not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{what} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value
