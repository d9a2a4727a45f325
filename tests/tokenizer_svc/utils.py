"""Helpers for the tokenizer service tests."""

from __future__ import annotations

from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.detokenizer import IncrementalDetokenizer
from splitserve.tokenizer_svc.tokenizer import TokenizerHandle, load_tokenizer


def load(path, **kwargs) -> TokenizerHandle:
    """Load a tokenizer folder the way the service does."""
    return load_tokenizer(TokenizerServiceConfig(tokenizer=str(path), **kwargs))


def stream_deltas(
    handle: TokenizerHandle,
    prompt_ids,
    generated_ids,
    chunks=None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Feed generated ids in `chunks` (sizes; default one by one); the deltas, flush last."""
    detok = IncrementalDetokenizer(handle, prompt_ids, skip_special_tokens)
    deltas, i = [], 0
    for size in chunks or [1] * len(generated_ids):
        deltas.append(detok.push(generated_ids[i : i + size]))
        i += size
    assert i == len(generated_ids)
    deltas.append(detok.flush())
    return deltas
