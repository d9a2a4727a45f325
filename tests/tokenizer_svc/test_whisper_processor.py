"""Whisper's inputs in the tokenizer service: the decoder prompt (vLLM's form with Whisper's
<|startofprev|>), features equal to transformers' extractor, and long audio split at the
quietest 100 ms window of the last second before each window's end (vLLM's split)."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.tokenizer_svc.whisper_processor import (
    SPLIT_WINDOW,
    WhisperPreprocessor,
    split,
    split_points,
)
from tests.models.whisper_utils import SAMPLING_RATE, build_whisper, random_audio

RATE = SAMPLING_RATE


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    from transformers import AutoTokenizer

    from splitserve.testing.demo_model import build_tokenizer

    tok_dir = build_tokenizer(tmp_path_factory.mktemp("tok"))
    path = build_whisper(tmp_path_factory.mktemp("whisper"), tok_dir, timestamps=False)
    return WhisperPreprocessor(str(path), AutoTokenizer.from_pretrained(path))


def test_decoder_prompt(pre):
    assert pre.languages == ["de", "en", "fr"]
    assert pre.decoder_prompt(None, "transcribe") == (
        "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
    )
    assert pre.decoder_prompt("fr", "translate", "before") == (
        "<|startofprev|>before<|startoftranscript|><|fr|><|translate|><|notimestamps|>"
    )
    with pytest.raises(ValueError, match="language 'xx' is not supported.*de, en, fr"):
        pre.decoder_prompt("xx", "transcribe")
    with pytest.raises(ValueError, match="task must be one of"):
        pre.decoder_prompt("en", "summarize")
    with pytest.raises(ValueError, match="no timestamp tokens"):
        pre.decoder_prompt("en", "transcribe", timestamps=True)


def test_chunk_prompt_and_features(pre):
    import transformers

    samples = random_audio(1, 2.0)
    prompt = pre.decoder_prompt("en", "transcribe")
    out = pre.process_chunk(prompt, samples)
    assert out.token_ids == pre.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(out.token_ids) == 4  # the four task tokens, nothing added
    (item,) = out.mm_inputs
    assert (item.offset, item.length) == (0, 4)  # the audio hash keys every prompt block
    assert item.num_frames == 200
    want = transformers.WhisperFeatureExtractor(feature_size=80)(
        samples, sampling_rate=RATE, return_tensors="np"
    ).input_features[0]
    got = np.frombuffer(item.input_features.data, dtype=np.float32).reshape(
        list(item.input_features.shape)
    )
    np.testing.assert_array_equal(got, want)
    other = pre.process_chunk(prompt, random_audio(2, 2.0)).mm_inputs[0]
    assert other.hash != item.hash


def test_split_at_the_quietest_window_before_each_mark():
    rng = np.random.default_rng(0)
    samples = (0.3 * rng.standard_normal(75 * RATE)).astype(np.float32)
    quiet = [int(29.4 * RATE), int(58.6 * RATE)]
    samples[quiet[0] : quiet[0] + SPLIT_WINDOW] *= 0.01  # exactly one search window
    samples[quiet[1] : quiet[1] + 2 * SPLIT_WINDOW] *= 0.01  # across two
    starts = split_points(samples, RATE, 30.0)
    assert len(starts) == 3
    assert starts[1] == quiet[0]  # windows are taken every 1600 samples from 29 s on
    assert starts[1] - RATE <= starts[2] - 30 * RATE <= starts[1]
    assert abs(starts[2] - quiet[1]) <= SPLIT_WINDOW
    chunks = split(samples, RATE, 30.0)
    assert sum(len(c) for c in chunks) == len(samples)
    assert all(len(c) <= 30 * RATE for c in chunks)
    assert split_points(samples[: 30 * RATE], RATE, 30.0) == [0]  # fits: one chunk
