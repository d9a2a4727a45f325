"""Stop strings over streamed text, alone and behind the detokenizer (SequenceStream)."""

from __future__ import annotations

import random

import pytest

from splitserve.tokenizer_svc.errors import InvalidRequest
from splitserve.tokenizer_svc.stop_strings import StopStringChecker
from splitserve.tokenizer_svc.stream import SequenceStream


def feed(checker: StopStringChecker, pieces: list[str]) -> tuple[list[str], str | None]:
    out = []
    for piece in pieces:
        result = checker.push(piece)
        out.append(result.text)
        if result.stop is not None:
            return out, result.stop
    out.append(checker.flush())
    return out, None


def test_stop_string_spanning_pieces():
    out, stop = feed(StopStringChecker(["STOP"]), ["Hello S", "T", "OP and more"])
    assert stop == "STOP"
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # "S" held back: it could start "STOP"


def test_include_stop_str_in_output():
    out, stop = feed(
        StopStringChecker(["STOP"], include_stop_str_in_output=True), ["Hello S", "TO", "P tail"]
    )
    assert stop == "STOP" and "".join(out) == "Hello STOP"


def test_earliest_match_wins():
    # Both complete in the same piece; "cd" starts earlier than "de" and than "xyz".
    out, stop = feed(StopStringChecker(["de", "cd", "xyz"]), ["ab", "cdefxyz"])
    assert stop == "cd" and "".join(out) == "ab"
    # Same start: the longer one (it matched too).
    out, stop = feed(StopStringChecker(["ab", "abc"]), ["xabcd"])
    assert stop == "abc" and "".join(out) == "x"


def test_held_prefix_released_at_flush():
    checker = StopStringChecker(["</answer>"])
    assert checker.push("42 </ans").text == "42 "
    assert checker.flush() == "</ans"


def test_held_prefix_released_when_it_stops_matching():
    checker = StopStringChecker(["STOP"])
    assert checker.push("ST").text == ""
    assert checker.push("AR").text == "STAR"


def test_match_starting_inside_held_text():
    checker = StopStringChecker(["ab"])
    assert checker.push("xa").text == "x"
    assert checker.push("a").text == "a"
    result = checker.push("b!")
    assert result.stop == "ab" and result.text == ""


def test_nothing_after_stop():
    checker = StopStringChecker(["\n\n"])
    result = checker.push("line\n\nnext")
    assert result.stop == "\n\n" and result.text == "line"
    assert checker.push("more").text == "" and checker.flush() == ""


def test_empty_stop_string_refused():
    with pytest.raises(InvalidRequest, match="empty"):
        StopStringChecker(["ok", ""])


def _oracle(stops, pieces, include):
    """What the stream should emit: cut at the first stop to complete (earliest start)."""
    text = ""
    for piece in pieces:
        text += piece
        found = [(text.find(s), -len(s), s) for s in stops if s in text]
        if found:
            start, _, stop = min(found)
            return (text[: start + len(stop)] if include else text[:start]), stop
    return text, None


def test_random_streams_match_oracle():
    rng = random.Random(7)
    alphabet = "abc "
    for _ in range(3000):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(1, 4))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        include = rng.random() < 0.5
        pieces, i = [], 0
        while i < len(text):
            k = rng.randrange(1, 5)
            pieces.append(text[i : i + k])
            i += k
        out, stop = feed(StopStringChecker(stops, include), pieces)
        # Output is cumulative, so matching the oracle's cut also means no earlier push
        # released anything past it.
        assert ("".join(out), stop) == _oracle(stops, pieces, include), (stops, pieces)


def test_sequence_stream_stop_spanning_tokens(handle):
    tok = handle.tokenizer
    ids = tok.encode("The result is done. Extra text here", add_special_tokens=False)
    seq = SequenceStream(handle, [], stop=["done."])
    out = []
    for i in ids:
        delta = seq.push([i])
        out.append(delta.text)
        if delta.stopped:
            assert delta.stop_reason == "done."
            break
    else:
        pytest.fail("stop string not found")
    assert "".join(out) == "The result is "
    after = seq.push(ids[-2:])
    assert after.stopped and after.text == "" and after.stop_reason == "done."
    final = seq.finish()
    assert final.stopped and final.flushed and final.text == ""


def test_sequence_stream_flush_releases_held_text(handle):
    tok = handle.tokenizer
    ids = tok.encode("answer: 42 </ans", add_special_tokens=False)
    seq = SequenceStream(handle, [], stop=["</answer>"])
    streamed = "".join(seq.push([i]).text for i in ids)
    final = seq.finish()
    assert final.flushed and not final.stopped
    assert streamed + final.text == "answer: 42 </ans"
    assert not streamed.endswith("</ans")
    with pytest.raises(InvalidRequest, match="after the end-of-sequence"):
        seq.push(ids[:1])
    assert seq.finish().flushed  # a second flush is harmless


def test_sequence_stream_multibyte_stop(handle):
    tok = handle.tokenizer
    ids = tok.encode("ok 🚀 then more", add_special_tokens=False)
    seq = SequenceStream(handle, [], stop=["🚀"], include_stop_str_in_output=True)
    out = []
    for i in ids:
        delta = seq.push([i])
        out.append(delta.text)
        if delta.stopped:
            break
    assert "".join(out) == "ok 🚀"


def test_sequence_stream_limits(handle):
    with pytest.raises(InvalidRequest, match="at most 2"):
        SequenceStream(handle, [], stop=["a", "b", "c"], max_stop_strings=2)
    with pytest.raises(InvalidRequest, match="negative"):
        SequenceStream(handle, [1, -3])
    seq = SequenceStream(handle, [])
    with pytest.raises(InvalidRequest, match="negative"):
        seq.push([5, -1])
