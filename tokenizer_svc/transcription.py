"""Prepare's speech-to-text input (Whisper): one audio file to engine prompts.

The file is decoded and resampled to the model's rate (`audio.py`, with the service's audio
limits: a 400 naming `file` past them), split into chunks of the model's window when longer
(`whisper_processor.split_points`, vLLM's split), and each chunk becomes one prompt: the
decoder's task prefix and the chunk's log-mel features. The response carries the audio's
duration and where each chunk starts, for the gateway's usage and timestamps.
"""

from __future__ import annotations

from splitserve.protos import tokenizer_pb2
from splitserve.tokenizer_svc import audio
from splitserve.tokenizer_svc.prepare import Prepared
from splitserve.tokenizer_svc.whisper_processor import WhisperPreprocessor, split_points


def prepare_transcription(
    pre: WhisperPreprocessor,
    request: tokenizer_pb2.TranscriptionInput,
    limits: audio.AudioLimits,
) -> tuple[list[Prepared], float]:
    """(one prompt per chunk, the audio's seconds); ValueError naming the problem."""
    language = request.language if request.HasField("language") else None
    decoder_prompt = pre.decoder_prompt(language, request.task, request.prompt, request.timestamps)
    rate = pre.sampling_rate
    wave = audio.load(request.audio, rate, "file", limits)
    starts = split_points(wave, rate, pre.chunk_seconds)
    ends = [*starts[1:], wave.shape[0]]
    prompts = []
    for start, end in zip(starts, ends, strict=True):
        processed = pre.process_chunk(decoder_prompt, wave[start:end])
        prompts.append(
            Prepared(
                processed.token_ids,
                decoder_prompt,
                list(processed.mm_inputs),
                audio_start_seconds=start / rate,
            )
        )
    return prompts, wave.shape[0] / rate
