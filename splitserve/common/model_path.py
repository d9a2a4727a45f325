"""Resolve a model argument to a local folder: a path as is, or a hub id via huggingface_hub.

Nothing here downloads when the files are already in the local Hugging Face cache; with
HF_HUB_OFFLINE=1 (or no network) the cache is the only source, as in tests.
"""

from __future__ import annotations

import logging
import os
import pathlib

logger = logging.getLogger(__name__)

CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
"""Everything but weights: configs, tokenizer files, chat templates, remote code."""
ALLOW_PATTERNS = [*CONFIG_PATTERNS, "*.safetensors"]
PT_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_local_folder(model: str) -> bool:
    return pathlib.Path(model).expanduser().is_dir()


def resolve_model_path(
    model: str,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    cache_dir: str | None = None,
    *,
    hub_flags: dict[str, str | None] | None = None,
    ignore_patterns: list[str] | None = None,
) -> pathlib.Path:
    """Return the local folder holding `model`.

    A folder that exists is used as it is; hub options set for it (`hub_flags`, by default
    --revision and --download-dir) are ignored with a warning. Anything else is taken as a hub
    id and resolved with `huggingface_hub.snapshot_download` into `cache_dir` (cache first;
    `revision` picks the branch, tag or commit; files matching `ignore_patterns` are not
    downloaded). Raises FileNotFoundError with the reason
    when neither works.
    """
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        flags = hub_flags if hub_flags is not None else {}
        flags = {"--revision": revision, "--download-dir": cache_dir, **flags}
        ignored = [f"{flag} {value}" for flag, value in flags.items() if value]
        if ignored:
            logger.warning(
                "%s is a local folder: ignoring %s (they apply to Hugging Face hub ids only)",
                model,
                ", ".join(ignored),
            )
        return path.resolve()
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model folder {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id=model,
            revision=revision,
            allow_patterns=allow_patterns or ALLOW_PATTERNS,
            ignore_patterns=ignore_patterns or None,
            cache_dir=cache_dir,
            local_files_only=hub_offline(),
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise FileNotFoundError(
            f"model {model!r} (revision {revision or 'main'}) is neither a local folder nor in "
            f"the Hugging Face cache{f' at {cache_dir}' if cache_dir else ''}, and could not be "
            f"downloaded: {exc}"
        ) from exc
    logger.info("resolved %s@%s to %s", model, revision or "main", local)
    return pathlib.Path(local)
