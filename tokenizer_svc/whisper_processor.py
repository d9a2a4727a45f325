"""Whisper inputs before the engine: log-mel features, the decoder prompt, long audio in chunks.

The model folder's `WhisperFeatureExtractor` (transformers) turns mono samples at its rate
into log-mel features padded to its window (`chunk_length` seconds, 30 for the released
models): the encoder input. The decoder prompt is Whisper's task prefix, as vLLM builds it:
`<|startoftranscript|><|{language}|><|transcribe|>` (or `<|translate|>`) `<|notimestamps|>`,
after `<|startofprev|>` and the caller's `prompt` text when one is given. The request's one
audio item spans the whole decoder prompt (`offset` 0, `length` all of it), so its hash keys
every prefix-cache block of the request: two audios never share decoder KV blocks.

Audio longer than the window is split as vLLM splits it: each chunk ends at the quietest
`SPLIT_WINDOW`-sample window (lowest RMS, the earliest of equals) within the last
`SPLIT_SEARCH_SECONDS` of the window, the next chunk starts there; the last chunk takes the
rest. Each chunk is one engine request; the texts are joined in order.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from splitserve.protos import common_pb2
from splitserve.tokenizer_svc import audio
from splitserve.tokenizer_svc.audio_processor import audio_hash
from splitserve.tokenizer_svc.multimodal import ProcessedPrompt, tensor_proto

TASKS = ("transcribe", "translate")
TIMESTAMP_ZERO = "<|0.00|>"
"""Whisper's first timestamp token; the others follow it in 0.02 s steps."""
SPLIT_WINDOW = 1600
"""Samples per energy window when looking for a split point (100 ms at 16 kHz; vLLM's
min_energy_split_window_size)."""
SPLIT_SEARCH_SECONDS = 1
"""How far before a chunk's end the split point is searched for (vLLM's overlap_chunk_second)."""


def split_points(samples: np.ndarray, rate: int, chunk_seconds: float) -> list[int]:
    """Start indices of the chunks of `samples` (the first is 0), vLLM's energy-based split."""
    chunk = int(rate * chunk_seconds)
    search = int(rate * SPLIT_SEARCH_SECONDS)
    starts, i, n = [0], 0, samples.shape[0]
    while i + chunk < n:
        lo, hi = i + chunk - search, min(i + chunk, n)
        segment = samples[lo:hi]
        best, split = math.inf, i + chunk  # a window too short to search: cut at the end
        for w in range(0, len(segment) - SPLIT_WINDOW, SPLIT_WINDOW):
            energy = float(np.sqrt(np.mean(segment[w : w + SPLIT_WINDOW] ** 2)))
            if energy < best:
                best, split = energy, lo + w
        i = split
        starts.append(i)
    return starts


def split(samples: np.ndarray, rate: int, chunk_seconds: float) -> list[np.ndarray]:
    """`samples` cut at `split_points` (one chunk when it fits the window)."""
    starts = split_points(samples, rate, chunk_seconds)
    ends = [*starts[1:], samples.shape[0]]
    return [samples[a:b] for a, b in zip(starts, ends, strict=True)]


class WhisperPreprocessor:
    """The feature extractor and task tokens of one Whisper model folder."""

    def __init__(self, path: str, tokenizer) -> None:
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor.from_pretrained(path)
        self.sampling_rate = int(self.extractor.sampling_rate)
        self.chunk_seconds = float(self.extractor.chunk_length)
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.languages = sorted(t[2:-2] for t in vocab if _is_language_token(t))
        """Language codes with a `<|xx|>` token in the vocabulary."""
        missing = [
            t
            for t in ("<|startoftranscript|>", "<|notimestamps|>", *(f"<|{x}|>" for x in TASKS))
            if t not in vocab
        ]
        if missing:
            raise ValueError(f"the Whisper tokenizer at {path} lacks {', '.join(missing)}")
        self.has_prev = "<|startofprev|>" in vocab
        self.has_timestamps = TIMESTAMP_ZERO in vocab

    def decoder_prompt(
        self, language: str | None, task: str, prompt: str = "", timestamps: bool = False
    ) -> str:
        """The decoder's task prefix (ending with the first timestamp, `<|0.00|>`, instead of
        `<|notimestamps|>` when `timestamps`, as vLLM's verbose_json); ValueError naming an
        unknown language or task."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        language = language or "en"  # vLLM's default when the request names none
        if language not in self.languages:
            raise ValueError(
                f"language {language!r} is not supported by this model; supported: "
                f"{', '.join(self.languages)}"
            )
        head = ""
        if prompt:
            if not self.has_prev:
                raise ValueError("this model's tokenizer has no <|startofprev|> for a prompt")
            head = f"<|startofprev|>{prompt}"
        tail = "<|notimestamps|>"
        if timestamps:
            if not self.has_timestamps:
                raise ValueError(
                    "this model's tokenizer has no timestamp tokens (<|0.00|>): "
                    "response_format verbose_json needs them"
                )
            tail = TIMESTAMP_ZERO
        return f"{head}<|startoftranscript|><|{language}|><|{task}|>{tail}"

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel features [mel bins, window frames] of mono samples at the model's rate
        (at most one window long)."""
        out = self.extractor(samples, sampling_rate=self.sampling_rate, return_tensors="np")
        return np.asarray(out["input_features"][0], dtype=np.float32)

    def split(self, samples: np.ndarray) -> list[np.ndarray]:
        return split(samples, self.sampling_rate, self.chunk_seconds)

    def process_chunk(self, decoder_prompt: str, samples: np.ndarray) -> ProcessedPrompt:
        """One engine prompt: the decoder prompt's ids and the chunk's features as the
        request's one audio item spanning them."""
        ids = self.tokenizer.encode(decoder_prompt, add_special_tokens=False)
        feats = self.features(samples)
        frames = min(feats.shape[1], math.ceil(samples.shape[0] / self.extractor.hop_length))
        t = tensor_proto(feats)
        item = common_pb2.MultiModalInput(
            modality="audio",
            input_features=t,
            num_frames=max(1, frames),
            hash=audio_hash(t, max(1, frames)),
            offset=0,
            length=len(ids),
        )
        return ProcessedPrompt(decoder_prompt, ids, [item])

    def process(self, prompt: str, items: list[tuple[np.ndarray, int]]) -> ProcessedPrompt:
        """vLLM's in-process form: a decoder prompt and one (samples, rate) audio of at most
        one window; ValueError naming the problem."""
        if len(items) != 1:
            raise ValueError(f"Whisper takes exactly one audio item per prompt, got {len(items)}")
        samples, rate = items[0]
        wave = audio.resample(audio.to_mono(samples, "audio 0"), int(rate), self.sampling_rate)
        limit = self.chunk_seconds * self.sampling_rate
        if wave.shape[0] > limit:
            raise ValueError(
                f"audio 0 lasts {wave.shape[0] / self.sampling_rate:.1f}s, more than the "
                f"model's {self.chunk_seconds:g}s window (the transcription endpoints split "
                "longer audio)"
            )
        return self.process_chunk(prompt, wave)


def _is_language_token(token: str) -> bool:
    code = token[2:-2]
    return (
        token.startswith("<|")
        and token.endswith("|>")
        and 2 <= len(code) <= 3
        and code.isalpha()
        and code.islower()
    )


def is_whisper_folder(path: pathlib.Path | None) -> bool:
    """Whether the model folder holds a Whisper encoder-decoder (its config's architecture)."""
    if path is None or not (path / "config.json").exists():
        return False
    import json

    raw = json.loads((path / "config.json").read_text())
    return "WhisperForConditionalGeneration" in (raw.get("architectures") or [])
