"""Config checks, tokenizer loading (auto / fast / slow), facts and id checks."""

from __future__ import annotations

import pytest

from splitserve.tokenizer_svc.config import TokenizerServiceConfig
from splitserve.tokenizer_svc.errors import InvalidRequest

from .utils import load, stream_deltas


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer": ""}, "tokenizer must name"),
        (
            {"tokenizer_mode": "turbo"},
            "tokenizer_mode must be one of auto, slow, fast, mistral, got 'turbo'",
        ),
        ({"chat_template_timeout_s": 0}, "chat_template_timeout_s must be > 0, got 0"),
        ({"max_stop_strings": -1}, "max_stop_strings must be >= 0, got -1"),
        ({"tokenizer_threads": 0}, "tokenizer_threads must be >= 1, got 0"),
        ({"shutdown_grace_s": -2}, "shutdown_grace_s must be >= 0, got -2"),
        ({"chat_template": "/no/such/template.jinja"}, "/no/such/template.jinja"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenizerServiceConfig(**{"tokenizer": "some/model", **kwargs})


def test_info(handle, bos_handle, no_template_dir):
    info = handle.info()
    tok = handle.tokenizer
    assert info.vocab_size == len(tok) == 1000
    assert info.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert info.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert info.has_chat_template
    assert not load(no_template_dir).info().has_chat_template


def test_missing_bos_is_minus_one(tmp_path):
    from splitserve.testing.demo_model import build_tokenizer

    path = build_tokenizer(tmp_path, vocab_size=300, with_bos_token=False)
    assert load(path).info().bos_token_id == -1


def test_encode_decode(handle, bos_handle):
    ids = handle.encode("héllo 🙂", add_special_tokens=True)
    assert handle.decode(ids, skip_special_tokens=False) == "héllo 🙂"
    with_bos = bos_handle.encode("hi", add_special_tokens=True)
    assert with_bos[0] == bos_handle.info().bos_token_id
    assert bos_handle.encode("hi", add_special_tokens=False) == with_bos[1:]
    eos = handle.info().eos_token_id
    assert handle.decode([*ids, eos], skip_special_tokens=True) == "héllo 🙂"
    assert handle.decode([*ids, eos], skip_special_tokens=False) == "héllo 🙂</s>"


@pytest.mark.parametrize(
    "ids, bad", [([5, -1], "-1"), ([5, 1000], "1000"), ([10**9], "1000000000")]
)
def test_decode_rejects_out_of_range(handle, ids, bad):
    with pytest.raises(InvalidRequest, match=rf"token id {bad} is outside \[0, 1000\)"):
        handle.decode(ids, skip_special_tokens=False)


def test_encode_text_edge_cases(handle):
    assert handle.encode("", add_special_tokens=False) == []
    assert handle.decode(handle.encode("a\x00b", add_special_tokens=False), False) == "a\x00b"
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        handle.encode("bad \udc80", add_special_tokens=False)


def test_modes(chatml_dir, byt5_dir):
    assert load(chatml_dir, tokenizer_mode="fast").is_fast
    assert load(chatml_dir, tokenizer_mode="auto").is_fast
    with pytest.raises(ValueError, match="tokenizer_mode='slow' needs a Python .slow. tokenizer"):
        load(chatml_dir, tokenizer_mode="slow")
    slow = load(byt5_dir, tokenizer_mode="slow")
    assert not slow.is_fast and slow.decode(slow.encode("ok ü", False), False) == "ok ü"
    assert not load(byt5_dir).is_fast  # auto takes what there is
    with pytest.raises(ValueError, match="tokenizer_mode='fast' needs a Rust"):
        load(byt5_dir, tokenizer_mode="fast")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")


def test_decode_each_byte_level(handle):
    ids = handle.encode("é🚀 ok", add_special_tokens=False)
    im_end = handle.tokenizer.convert_tokens_to_ids("<|im_end|>")
    strings, raw = handle.decode_each([*ids, im_end, handle.vocab_size + 3])
    assert strings == [handle.tokenizer.decode([i]) for i in ids] + ["<|im_end|>", ""]
    assert "\ufffd" in strings[0]  # "é" is split: the text of one byte is U+FFFD...
    assert b"".join(raw[: len(ids)]).decode("utf-8") == "é🚀 ok"  # ...its bytes are exact
    assert raw[-2:] == [b"<|im_end|>", b""]
    with pytest.raises(InvalidRequest, match="token id -4 is negative"):
        handle.decode_each([3, -4])


def test_metaspace_byte_fallback_tokenizer(tmp_path):
    """A Llama-style tokenizer (U+2581 for spaces, <0xNN> byte tokens), not byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "h": 2, "i": 3, "<0xC3>": 4, "<0xA9>": 5, "▁h": 6}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h")], byte_fallback=True, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    llama_like = load(tmp_path)
    ids = llama_like.encode("hi é", add_special_tokens=False)
    assert 4 in ids and 5 in ids  # "é" went through byte fallback
    strings, raw = llama_like.decode_each(ids)
    assert raw[ids.index(4)] == b"\xc3" and raw[ids.index(5)] == b"\xa9"
    assert strings[ids.index(4)] == "\ufffd"
    deltas = stream_deltas(llama_like, [], ids)
    assert "".join(deltas) == llama_like.tokenizer.decode(ids) == "hi é"
    assert all("\ufffd" not in d for d in deltas)


def test_tokenizer_revision_and_download_dir(chatml_dir, no_template_dir, tmp_path, monkeypatch):
    """A hub cache in a download dir: main has a chat template, v2 none (offline)."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "dl" / "models--tiny-org--tok"
    for commit, src in (("a" * 40, chatml_dir), ("b" * 40, no_template_dir)):
        shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dl = str(tmp_path / "dl")
    assert load("tiny-org/tok", download_dir=dl).has_chat_template
    assert not load("tiny-org/tok", download_dir=dl, revision="v2").has_chat_template
    # --tokenizer-revision wins over --revision for the tokenizer.
    handle = load("tiny-org/tok", download_dir=dl, revision="main", tokenizer_revision="v2")
    assert not handle.has_chat_template
    handle = load("tiny-org/tok", download_dir=dl, revision="v2", tokenizer_revision="main")
    assert handle.has_chat_template
    with pytest.raises(FileNotFoundError, match="tiny-org/tok"):
        load("tiny-org/tok")  # not in the default cache


def test_local_tokenizer_ignores_revision_with_a_warning(chatml_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="splitserve.common.model_path"):
        assert load(chatml_dir, tokenizer_revision="v9").has_chat_template
    assert any("ignoring --tokenizer-revision v9" in r.getMessage() for r in caplog.records)


def test_mistral_mode_names_the_missing_package(chatml_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mistral_common", None)
    with pytest.raises(ValueError, match="needs the mistral_common package.*pip install"):
        load(chatml_dir, tokenizer_mode="mistral")


def _write_tekken(out, merges=(b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world")):
    """A tiny mistral_common tekken.json: the 256 bytes, a few merges, 100 special tokens."""
    import base64
    import json

    pieces = [bytes([i]) for i in range(256)] + list(merges)
    vocab = [
        {"rank": r, "token_bytes": base64.b64encode(p).decode(), "token_str": None}
        for r, p in enumerate(pieces)
    ]
    pattern = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    config = {
        "pattern": pattern,
        "num_vocab_tokens": len(pieces),
        "default_vocab_size": len(pieces) + 100,
        "default_num_special_tokens": 100,
        "version": "v7",
    }
    out.mkdir()
    (out / "tekken.json").write_text(json.dumps({"vocab": vocab, "config": config}))
    return out


def test_mistral_mode_with_a_tekken_tokenizer(tmp_path):
    pytest.importorskip("mistral_common")
    handle = load(_write_tekken(tmp_path / "tekken"), tokenizer_mode="mistral")
    assert type(handle.tokenizer).__name__ == "MistralCommonBackend"
    assert handle.vocab_size == 256 + 8 + 100
    text = "hello world, héllo wörld 🙂"
    ids = handle.encode(text, add_special_tokens=False)
    assert ids[:2] == [100 + 256 + 3, 100 + 256 + 7]  # "hello", " world" (after the specials)
    assert handle.decode(ids, skip_special_tokens=True) == text
    with_bos = handle.encode(text, add_special_tokens=True)
    assert with_bos[0] == handle.info().bos_token_id == 1
    assert handle.decode(with_bos, skip_special_tokens=True) == text
    # Streaming splits multi-byte characters across byte tokens; the deltas still add up.
    deltas = stream_deltas(handle, with_bos[:1], with_bos[1:])
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    strings, raw = handle.decode_each(ids)
    assert b"".join(raw) == text.encode()
    assert strings[:2] == ["hello", " world"]
