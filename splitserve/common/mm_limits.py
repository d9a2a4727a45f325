"""`--limit-mm-per-prompt`: how many multimodal items one prompt may carry, per modality.

Read by the gateway (it refuses extra images before fetching any) and the tokenizer service
(it refuses them before processing any), so both see the same limits.
"""

from __future__ import annotations

import json
import re

DEFAULT_IMAGE_LIMIT = 4
"""Images one prompt may carry unless --limit-mm-per-prompt says otherwise (vLLM allows 999;
every image is encoded and its pixels cross gRPC, so splitserve keeps a small bound)."""
DEFAULT_AUDIO_LIMIT = 4
"""Audio items one prompt may carry unless --limit-mm-per-prompt says otherwise."""
MODALITIES = ("image", "audio")
_KEY_VALUES = re.compile(r"^\s*\w+\s*=\s*-?\d+\s*(,\s*\w+\s*=\s*-?\d+\s*)*$")


def parse_mm_limits(value: str | dict | None) -> dict[str, int]:
    """`--limit-mm-per-prompt` (JSON object, e.g. '{"image": 2}', older vLLM's 'image=2', or a
    dict) -> modality -> limit, with the default for modalities it leaves out; ValueError
    naming the bad entry."""
    if value is None or value == "":
        raw: dict = {}
    elif isinstance(value, dict):
        raw = value
    elif _KEY_VALUES.match(value):
        raw = {k.strip(): int(v) for k, v in (item.split("=") for item in value.split(","))}
    else:
        try:
            raw = json.loads(value)
        except ValueError as exc:
            raise ValueError(
                f"limit_mm_per_prompt must be a JSON object such as '{{\"image\": 2}}', got "
                f"{value!r}: {exc}"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"limit_mm_per_prompt must be a JSON object, got {value!r}")
    limits = {"image": DEFAULT_IMAGE_LIMIT, "audio": DEFAULT_AUDIO_LIMIT}
    for key, limit in raw.items():
        if key not in MODALITIES:
            raise ValueError(
                f"limit_mm_per_prompt: unsupported modality {key!r}; supported: "
                f"{', '.join(MODALITIES)}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(
                f"limit_mm_per_prompt[{key!r}] must be a non-negative integer, got {limit!r}"
            )
        limits[key] = limit
    return limits


def canonical_mm_limits(value: str | dict | None) -> str | None:
    """The flag's value as compact JSON (a dict from the in-process LLM becomes text too)."""
    if value is None:
        return None
    return json.dumps(parse_mm_limits(value), sort_keys=True, separators=(",", ":"))
