"""Resolve a model argument to a local folder: a path as is, or a hub id via huggingface_hub.

Nothing here downloads when the files are already in the local Hugging Face cache; with
HF_HUB_OFFLINE=1 (or no network) the cache is the only source, as in tests.
"""

from __future__ import annotations

import logging
import os
import pathlib

logger = logging.getLogger(__name__)

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def resolve_model_path(
    model: str,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    cache_dir: str | None = None,
) -> pathlib.Path:
    """Return the local folder holding `model`.

    A folder that exists is used as it is. Anything else is taken as a hub id and resolved
    with `huggingface_hub.snapshot_download` (cache first; `revision` picks the branch, tag
    or commit). Raises FileNotFoundError with the reason when neither works.
    """
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model folder {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(
            repo_id=model,
            revision=revision,
            allow_patterns=allow_patterns or ALLOW_PATTERNS,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise FileNotFoundError(
            f"model {model!r} (revision {revision or 'main'}) is neither a local folder nor in "
            f"the Hugging Face cache, and could not be downloaded: {exc}"
        ) from exc
    logger.info("resolved %s@%s to %s", model, revision or "main", local)
    return pathlib.Path(local)
