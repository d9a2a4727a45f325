"""Adapter folders' tokenizers (tokenizer_svc/adapter_tokenizers.py): the adapter's added tokens
for its requests, the base tokenizer for folders without one, paths checked first."""

from __future__ import annotations

import json

import pytest

from splitserve.common.lora import LoRAPathError
from splitserve.tokenizer_svc.adapter_tokenizers import AdapterTokenizers
from splitserve.tokenizer_svc.config import TokenizerServiceConfig


def _adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    return folder


def test_adapter_folders_tokenize_with_their_added_tokens(chatml_dir, handle, tmp_path):
    from transformers import AutoTokenizer

    root = tmp_path / "root"
    plain = _adapter(root / "plain")
    added = _adapter(root / "added")
    tok = AutoTokenizer.from_pretrained(str(chatml_dir))
    tok.add_tokens(["<new_a>", "<new_b>"])
    tok.save_pretrained(str(added))
    outside = _adapter(tmp_path / "outside")
    tokenizers = AdapterTokenizers(
        TokenizerServiceConfig(tokenizer=str(chatml_dir)), handle, [root.resolve()]
    )
    assert tokenizers.get("") is handle and tokenizers.get(str(plain)) is handle
    own = tokenizers.get(str(added))
    assert own is not handle and own.vocab_size == handle.vocab_size + 2
    assert own.encode("x <new_b>", False)[-1] == handle.vocab_size + 1
    assert tokenizers.get("added") is own  # relative to the root; loaded once
    with pytest.raises(LoRAPathError, match="outside the allowed root"):
        tokenizers.get(str(outside))
