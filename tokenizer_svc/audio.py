"""Audio inputs before the engine: decode, mix down to mono, resample to the model's rate.

Decoding goes through libsndfile (the `soundfile` package): WAV, FLAC, Ogg (Vorbis, Opus) and
MP3, whatever the file's own header says, not the name a client gave it. Channels are averaged
into one. Resampling uses libsoxr (the `soxr` package) at its high quality setting: a band-limited
polyphase filter, so content above the new Nyquist frequency is removed instead of folding back
as it would with linear interpolation (a 7 kHz tone resampled to 16 kHz stays a 7 kHz tone; a
10 kHz one is attenuated, not aliased to 6 kHz).

Limits are checked on what is cheap first: the encoded size before decoding, the duration from
the header before decoding the samples. Every refusal is an `AudioError` whose message names the
part (`messages[0].content[1]`, `file`), which the service turns into a 400.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

RESAMPLE_QUALITY = "HQ"
"""soxr's quality preset: 'HQ' is its high quality band-limited filter (vLLM's audio path uses
a polyphase filter too; 'VHQ' costs more and changes nothing measurable at 16 kHz)."""


class AudioError(ValueError):
    """Audio that cannot be used: not decodable, or past a limit. The message names the part."""


@dataclass(frozen=True)
class AudioLimits:
    """What one audio part may be."""

    max_bytes: int = 25 * 1024 * 1024
    """Encoded size (OpenAI's transcription upload limit is 25 MB)."""
    max_seconds: float = 600.0
    """Duration after decoding, before resampling."""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or not self.max_seconds > 0:
            raise ValueError(
                f"audio limits must be positive, got max_bytes={self.max_bytes}, "
                f"max_seconds={self.max_seconds}"
            )


def decode(data: bytes, part: str, limits: AudioLimits = AudioLimits()) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of an encoded file."""
    import soundfile

    if not data:
        raise AudioError(f"{part}: the audio is empty")
    if len(data) > limits.max_bytes:
        raise AudioError(
            f"{part}: the audio is {len(data)} bytes, more than the {limits.max_bytes} allowed"
        )
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise AudioError(f"{part}: the audio declares a sample rate of {rate}")
            # NOTE: some encoders (MP3 without a length tag) report no frame count up front;
            # the decoded length is checked below as well.
            if frames > 0 and frames / rate > limits.max_seconds:
                raise AudioError(_too_long(part, frames / rate, limits))
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(
            f"{part}: the audio could not be decoded (WAV, FLAC, Ogg and MP3 are read): {exc}"
        ) from None
    if samples.shape[0] / rate > limits.max_seconds:
        raise AudioError(_too_long(part, samples.shape[0] / rate, limits))
    return to_mono(samples, part), rate


def to_mono(samples, part: str) -> np.ndarray:
    """Samples [n] or [n, channels] as contiguous mono float32 (channels averaged);
    AudioError naming the part when empty, of another shape, or not finite."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if samples.ndim != 1:
        raise AudioError(
            f"{part}: expected mono samples or [samples, channels], got shape {samples.shape}"
        )
    if samples.size == 0:
        raise AudioError(f"{part}: the audio has no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{part}: the audio holds samples that are not finite numbers")
    return np.ascontiguousarray(samples)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """`samples` (mono float32) from `rate` to `target_rate`, band-limited."""
    import soxr

    if rate == target_rate:
        return samples
    out = soxr.resample(samples, rate, target_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(out, dtype=np.float32)


def load(
    data: bytes, target_rate: int, part: str, limits: AudioLimits = AudioLimits()
) -> np.ndarray:
    """An encoded file as mono float32 samples at `target_rate` (the model's rate)."""
    samples, rate = decode(data, part, limits)
    return resample(samples, rate, target_rate)


def _too_long(part: str, seconds: float, limits: AudioLimits) -> str:
    return f"{part}: the audio lasts {seconds:.1f}s, more than the {limits.max_seconds:g}s allowed"
