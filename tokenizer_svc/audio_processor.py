"""Audio inputs before the engine: the model's own processor expands the prompt and makes features.

`AudioPreprocessor` runs the Hugging Face processor of the model folder (`AutoProcessor`: the
tokenizer plus a feature extractor; Qwen2-Audio's pairs Whisper's log-mel extractor with its
Qwen2 tokenizer) on a prompt and its audio. Each audio is first brought to the extractor's
sampling rate with the band-limited resampler of `audio.py`. The processor replaces each audio
placeholder (`<|AUDIO|>`) with as many placeholder tokens as the encoder yields for that audio's
length; each item's span of those tokens, its features (raw bytes + dtype + shape, never
pickle), how many frames hold audio, and a SHA-256 of them go to the engine as a
`MultiModalInput`. The hash keys the prefix cache, as for images.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from splitserve.protos import common_pb2
from splitserve.tokenizer_svc import audio
from splitserve.tokenizer_svc.multimodal import ProcessedPrompt, placeholder_spans, tensor_proto


def audio_hash(features: common_pb2.TensorData, num_frames: int) -> bytes:
    """SHA-256 of a processed audio item: dtype, shape, bytes and its audio frames."""
    h = hashlib.sha256(b"splitserve-audio-v1")
    h.update(features.dtype.encode() + b"\x00")
    h.update(np.asarray([*features.shape, num_frames], dtype="<i8").tobytes())
    h.update(features.data)
    return h.digest()


class AudioPreprocessor:
    """The processor of one model folder, for prompts with audio."""

    def __init__(
        self,
        path: str,
        audio_token_id: int,
        limits: dict[str, int],
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        extractor = getattr(self.processor, "feature_extractor", None)
        if extractor is None:
            raise ValueError(f"the model at {path} has no audio feature extractor")
        self.sampling_rate = int(extractor.sampling_rate)
        self.audio_token_id = audio_token_id
        self.audio_token = self.processor.tokenizer.convert_ids_to_tokens(audio_token_id)
        bos = getattr(self.processor, "audio_bos_token", None) or ""
        eos = getattr(self.processor, "audio_eos_token", None) or ""
        self.placeholder = f"{bos}{self.audio_token}{eos}"
        """What stands for one item in a prompt (chat's string content format writes it)."""
        self.limits = limits

    def check_count(self, num_items: int) -> None:
        """ValueError when a prompt carries more audio items than the limit."""
        limit = self.limits["audio"]
        if num_items > limit:
            raise ValueError(
                f"the prompt carries {num_items} audio items, more than the limit of {limit} "
                "(--limit-mm-per-prompt)"
            )

    def process_files(
        self,
        prompt: str,
        blobs: list[bytes],
        limits: audio.AudioLimits = audio.AudioLimits(),
        add_special_tokens: bool = True,
    ) -> ProcessedPrompt:
        """`process` for encoded audio files (WAV, FLAC, Ogg, MP3)."""
        self.check_count(len(blobs))
        waves = [
            audio.load(blob, self.sampling_rate, f"audio {i}", limits)
            for i, blob in enumerate(blobs)
        ]
        return self.process(prompt, [(w, self.sampling_rate) for w in waves], add_special_tokens)

    def process(
        self,
        prompt: str,
        items: list[tuple[np.ndarray, int]],
        add_special_tokens: bool = True,
    ) -> ProcessedPrompt:
        """Expand `prompt` (one audio placeholder per item) and make each item's features from
        (samples, sampling rate) pairs (vLLM's form); ValueError naming the problem."""
        self.check_count(len(items))
        found = prompt.count(self.audio_token)
        if found != len(items):
            raise ValueError(
                f"the prompt holds {found} audio placeholders ({self.audio_token!r}) for "
                f"{len(items)} audio items: put one placeholder where each goes"
            )
        waves = []
        for i, (samples, rate) in enumerate(items):
            mono = audio.to_mono(samples, f"audio {i}")
            waves.append(audio.resample(mono, int(rate), self.sampling_rate))
        try:
            out = self.processor(
                text=[prompt],
                audio=waves or None,
                sampling_rate=self.sampling_rate,
                return_tensors="np",
                add_special_tokens=add_special_tokens,
            )
        except Exception as exc:  # the processor's own message names the problem
            raise ValueError(f"the model's processor refused the input: {exc}") from exc
        ids = [int(t) for t in np.asarray(out["input_ids"])[0].tolist()]
        if not waves:
            return ProcessedPrompt(prompt, ids, [])
        features = np.asarray(out["input_features"], dtype=np.float32)
        frames = np.asarray(out["feature_attention_mask"]).sum(-1).astype(int).tolist()
        lengths = [((((f - 1) // 2 + 1) - 2) // 2 + 1) for f in frames]
        spans = placeholder_spans(ids, self.audio_token_id, len(waves), "audio", lengths)
        mm_inputs = []
        for (offset, length), feats, n in zip(spans, features, frames, strict=True):
            t = tensor_proto(feats)
            mm_inputs.append(
                common_pb2.MultiModalInput(
                    modality="audio",
                    input_features=t,
                    num_frames=n,
                    hash=audio_hash(t, n),
                    offset=offset,
                    length=length,
                )
            )
        return ProcessedPrompt(prompt, ids, mm_inputs)


def audio_token_id_of(path: pathlib.Path) -> int | None:
    """The audio placeholder token id of the model folder's config.json (Qwen2-Audio's
    audio_token_index), or None for a model that takes no audio."""
    config = path / "config.json"
    if not config.exists():
        return None
    raw = json.loads(config.read_text())
    value = raw.get("audio_token_id", raw.get("audio_token_index"))
    return int(value) if value is not None else None


def load_audio_preprocessor(
    path: pathlib.Path | None, limits: dict[str, int], trust_remote_code: bool = False
):
    """The AudioPreprocessor of a model folder whose config names an audio token and which
    ships a feature extractor config; None otherwise."""
    if path is None:
        return None
    token_id = audio_token_id_of(path)
    has_processor = any(
        (path / name).exists() for name in ("processor_config.json", "preprocessor_config.json")
    )
    if token_id is None or not has_processor:
        return None
    return AudioPreprocessor(str(path), token_id, limits, trust_remote_code)
