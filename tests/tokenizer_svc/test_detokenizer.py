"""Incremental detokenization: streamed deltas must join to the one-shot decode."""

from __future__ import annotations

import random

import pytest

from splitserve.tokenizer_svc.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer

from .utils import load, stream_deltas

MULTIBYTE_TEXTS = [
    "héllo 你好 🙂🚀",
    "naïve café, Grüße! こんにちは世界 👩‍👩‍👧‍👦 done",
    "🙂🙂🙂 ñ ü é à ø ß 漢字かなカナ 한국어 العربية",
    "x🚀y",
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_text_one_token_at_a_time(handle, text):
    tok = handle.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    # Characters really span several tokens here, or the test would prove nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    prompt = tok.encode("Say it:", add_special_tokens=False)
    deltas = stream_deltas(handle, prompt, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text == tok.decode(ids)
    assert deltas[-1] == ""  # nothing was left for the flush


def test_random_ids_match_full_decode(handle):
    rng = random.Random(1234)
    tok = handle.tokenizer
    for _ in range(600):
        skip = rng.random() < 0.5
        prompt = [rng.randrange(handle.vocab_size) for _ in range(rng.randrange(0, 12))]
        generated = [rng.randrange(handle.vocab_size) for _ in range(rng.randrange(1, 40))]
        chunks, left = [], len(generated)
        while left:
            chunks.append(min(left, rng.randrange(1, 5)))
            left -= chunks[-1]
        deltas = stream_deltas(handle, prompt, generated, chunks, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(generated, skip_special_tokens=skip), (
            prompt,
            generated,
            skip,
        )


def test_prompt_context_gives_leading_space(handle):
    tok = handle.tokenizer
    prompt = tok.encode("The answer is", add_special_tokens=False)
    full = tok.encode("The answer is 42 and more", add_special_tokens=False)
    generated = full[len(prompt) :]
    assert full[: len(prompt)] == prompt
    assert "".join(stream_deltas(handle, prompt, generated)) == " 42 and more"


def test_prompt_ending_inside_a_character(handle):
    tok = handle.tokenizer
    ids = tok.encode("ab🚀", add_special_tokens=False)
    # Split the emoji's bytes between prompt and generation.
    cut = next(i for i in range(len(ids)) if "\ufffd" in tok.decode(ids[: i + 1]))
    prompt, generated = ids[: cut + 1], ids[cut + 1 :]
    deltas = stream_deltas(handle, prompt, generated)
    assert "".join(deltas) == tok.decode(generated)


def test_skip_special_tokens(handle):
    tok = handle.tokenizer
    text_ids = tok.encode("Hi there", add_special_tokens=False)
    eos, im_end_id = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    generated = text_ids[:1] + [im_end_id] + text_ids[1:] + [eos]
    skipped = "".join(stream_deltas(handle, [], generated, skip_special_tokens=True))
    kept = "".join(stream_deltas(handle, [], generated, skip_special_tokens=False))
    assert skipped == "Hi there" == tok.decode(generated, skip_special_tokens=True)
    assert kept == tok.decode(generated, skip_special_tokens=False)
    assert "<|im_end|>" in kept and kept.endswith("</s>")


def test_special_tokens_in_prompt_context_are_skipped(handle):
    tok = handle.tokenizer
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    generated = tok.encode("Sure", add_special_tokens=False)
    assert "".join(stream_deltas(handle, prompt, generated)) == "Sure"


def test_ids_past_the_vocabulary_decode_to_nothing(handle):
    tok = handle.tokenizer
    ids = tok.encode("ok", add_special_tokens=False)
    deltas = stream_deltas(handle, [], [ids[0], handle.vocab_size + 7, *ids[1:]])
    assert "".join(deltas) == "ok"


def test_invalid_bytes_released_at_flush(handle):
    tok = handle.tokenizer
    lead = tok.convert_tokens_to_ids("ð")  # byte 0xF0: starts a 4-byte character
    ids = tok.encode("a", add_special_tokens=False) + [lead]
    detok = IncrementalDetokenizer(handle, [], True)
    assert detok.push(ids) == "a"
    assert detok.flush() == "\ufffd" and tok.decode(ids).endswith("\ufffd")


def test_window_stays_short(handle):
    """Each step decodes a window that does not grow with the sequence."""
    tok = handle.tokenizer
    ids = tok.encode("héllo wörld 你好 " * 200, add_special_tokens=False)
    calls = []
    inner = handle.tokens_to_string

    class Spy:
        def __getattr__(self, name):
            return getattr(handle, name)

        def tokens_to_string(self, tokens):
            calls.append(len(tokens))
            return inner(tokens)

    detok = IncrementalDetokenizer(Spy(), [], True)  # type: ignore[arg-type]
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert len(ids) > 1000 and text == tok.decode(ids)
    assert max(calls) <= 12
    assert len(detok._tokens) < 300  # and the tokens behind the window are dropped


def test_long_run_of_invalid_bytes_is_released(handle):
    tok = handle.tokenizer
    cont = tok.convert_tokens_to_ids("Ģ")  # byte 0x80: a stray continuation byte
    detok = IncrementalDetokenizer(handle, [], True)
    out = [detok.push([cont]) for _ in range(MAX_HELD_TOKENS + 3)]
    assert any(out), "a run of invalid bytes must not be held forever"
    out.append(detok.flush())
    assert "".join(out) == tok.decode([cont] * (MAX_HELD_TOKENS + 3))


def test_slow_tokenizer(byt5_dir):
    slow = load(byt5_dir)
    assert not slow.is_fast
    tok = slow.tokenizer
    text = "héllo 你好 🙂🚀"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream_deltas(slow, tok.encode("Hi ", add_special_tokens=False), ids)
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


class _NoMemo:
    """The handle without its `one_token_texts`: every window is decoded by the tokenizer."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def __getattr__(self, name):
        if name == "one_token_texts":
            raise AttributeError(name)
        return getattr(self._handle, name)


def test_single_token_memo_changes_no_delta(handle):
    """The handle's memo of one-token decodes gives every step the same delta as decoding
    each window afresh, over random ids (invalid bytes, special tokens) and many sequences
    sharing one memo."""
    rng = random.Random(7)
    handle.one_token_texts.clear()
    for _ in range(300):
        skip = rng.random() < 0.5
        prompt = [rng.randrange(handle.vocab_size) for _ in range(rng.randrange(0, 8))]
        ids = [rng.randrange(handle.vocab_size) for _ in range(rng.randrange(1, 30))]
        memo = IncrementalDetokenizer(handle, prompt, skip)
        fresh = IncrementalDetokenizer(_NoMemo(handle), prompt, skip)  # type: ignore[arg-type]
        assert [memo.push([i]) for i in ids] == [fresh.push([i]) for i in ids]
        assert memo.flush() == fresh.flush()
    assert handle.one_token_texts, "the memo was never used"
    for token, text in handle.one_token_texts.items():
        assert text == handle.tokens_to_string([token])
