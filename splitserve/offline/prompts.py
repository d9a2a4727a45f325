"""Prompt inputs of the offline engine, shared by `LLM.generate` and `LLM.embed`: vLLM's
prompt forms (a string, token ids, a TextPrompt / TokensPrompt dict, or a list of them) and its
progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_PROMPT_KEYS = {"prompt", "prompt_token_ids", "cache_salt", "multi_modal_data"}


def unpack_prompt_dict(p: dict) -> tuple[str | list[int], str, dict | None]:
    """vLLM's TextPrompt / TokensPrompt: (text or token ids, cache salt, multi_modal_data)."""
    unknown = sorted(set(p) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(
            f"prompt dict keys {unknown} are not supported; expected 'prompt' or "
            "'prompt_token_ids', optionally with 'cache_salt' and 'multi_modal_data'"
        )
    if ("prompt" in p) == ("prompt_token_ids" in p):
        raise ValueError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
    salt = p.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    text = p["prompt"] if "prompt" in p else list(p["prompt_token_ids"])
    return text, salt or "", p.get("multi_modal_data")


def as_batch(prompts) -> list:
    """One prompt or a list of prompts, as a list (a list of ints is one prompt of token ids)."""
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def progress_bar(use_tqdm: bool | Callable[..., Any], total: int):
    """vLLM's progress bar over the prompts: tqdm for True, the callable itself when one is
    given (a tqdm-like class), none for False."""
    if use_tqdm is False or use_tqdm is None:
        return None
    if use_tqdm is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
    return use_tqdm(total=total, desc="Processed prompts")
