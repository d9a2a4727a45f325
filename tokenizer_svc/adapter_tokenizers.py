"""Tokenizers of LoRA adapter folders: an adapter trained with added tokens ships a tokenizer
whose added tokens take the ids past the base vocabulary (the rows the worker reads, see
worker/lora_vocab.py). Requests through that adapter tokenize and detokenize with it; an
adapter folder without tokenizer files uses the base tokenizer.

Folders are checked against the allowed roots (--lora-root, else the --lora-modules folders)
before anything is opened, as the workers do; loaded tokenizers are kept by folder, the least
recently used dropped past `max_cached`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from splitserve.common.lora import TOKENIZER_FILES, resolve_adapter_path

from .config import TokenizerServiceConfig
from .tokenizer import TokenizerHandle, load_tokenizer

logger = logging.getLogger(__name__)


class AdapterTokenizers:
    """Adapter folder -> its TokenizerHandle (or the base one), cached."""

    def __init__(
        self,
        config: TokenizerServiceConfig,
        base: TokenizerHandle,
        roots: list[Path],
        max_cached: int = 8,
    ) -> None:
        self.config = config
        self.base = base
        self.roots = roots
        self.max_cached = max_cached
        self._cache: OrderedDict[Path, TokenizerHandle] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lora_path: str | None) -> TokenizerHandle:
        """The tokenizer for requests through the adapter at `lora_path` (None or "": the
        base). Raises LoRAPathError for a folder outside the allowed roots."""
        if not lora_path:
            return self.base
        folder = resolve_adapter_path(str(lora_path), self.roots)
        with self._lock:
            handle = self._cache.get(folder)
            if handle is not None:
                self._cache.move_to_end(folder)
                return handle
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return self.base
        # NOTE: the operator's chat template (if any) stays; the adapter's own tokenizer_config
        # template applies otherwise, as the base model's does.
        handle = load_tokenizer(
            dataclasses.replace(self.config, tokenizer=str(folder), tokenizer_revision=None)
        )
        if handle.vocab_size < self.base.vocab_size:
            raise ValueError(
                f"the tokenizer of adapter folder {folder} has {handle.vocab_size} tokens, "
                f"fewer than the base tokenizer's {self.base.vocab_size}"
            )
        logger.info("adapter tokenizer of %s: %d tokens", folder, handle.vocab_size)
        with self._lock:
            self._cache[folder] = handle
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return handle
