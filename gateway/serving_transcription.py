"""POST /v1/audio/transcriptions and /v1/audio/translations (speech-to-text models: Whisper).

The form (transcription_form.py) goes to the tokenizer service in one Prepare call, which
decodes the file, splits audio longer than the model's window into chunks (vLLM's split) and
returns one prompt per chunk: Whisper's decoder prompt with the chunk's features. Every chunk
runs as its own engine sequence, all at once; their texts are joined in order, as vLLM does.

Streaming sends vLLM's chunk format: `{"object": "transcription.chunk" (or
"translation.chunk"), "choices": [{"delta": {"content": ...}}]}` events, chunk after chunk in
audio order (a later chunk's output waits until the earlier ones have finished), each audio
chunk's last event with its `finish_reason`; with `stream_include_usage` a last event with
`usage`, then `[DONE]`. `verbose_json` decodes with timestamp tokens and returns the segments
between them (vLLM's method: a segment ends where two timestamp tokens meet).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable
from types import SimpleNamespace

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from splitserve.gateway.errors import bad_request
from splitserve.gateway.generation import Deadline, SequenceDelta, merge_deltas
from splitserve.gateway.prepare import check_prompt_chars, prepare
from splitserve.gateway.request_log import log_request
from splitserve.gateway.sampling import build_sampling, resolve_max_tokens, sequence_specs
from splitserve.gateway.serving_base import ServingBase
from splitserve.gateway.streaming import sse
from splitserve.gateway.transcription_form import TranscriptionForm, parse_form
from splitserve.protos import tokenizer_pb2

TIMESTAMP_STEP_S = 0.02
"""Seconds between Whisper's consecutive timestamp tokens."""


class TranscriptionService(ServingBase):
    """Both speech-to-text endpoints; `task` is "transcribe" or "translate"."""

    async def create(self, raw: Request, task: str) -> Response:
        arrival = time.monotonic()
        form = await parse_form(await raw.form(), task)
        model = await self.check_model(form.model)
        info = self.clients.tokenizer_info
        if info is None or not info.supports_transcription:
            what = "Transcriptions" if task == "transcribe" else "Translations"
            raise bad_request(
                f"the model {model!r} does not support the {what} API: it is not a "
                "speech-to-text model (Whisper)",
                "model",
            )
        check_prompt_chars(self.clients, len(form.prompt), "prompt", "prompt")
        deadline = self.deadline()
        request = tokenizer_pb2.PrepareRequest(
            transcription=tokenizer_pb2.TranscriptionInput(
                audio=form.file,
                task=task,
                prompt=form.prompt,
                timestamps=form.response_format == "verbose_json",
            )
        )
        if form.language is not None:
            request.transcription.language = form.language
        prepared = await prepare(self.clients, request, deadline, prompt_param="file")
        limits = self.limits()
        sampling = build_sampling(
            _sampling_fields(form),
            limits,
            n=1,
            stop=[],
            logprobs=1 if form.response_format == "verbose_json" else None,
            prompt_logprobs=None,
            max_tokens=form.max_completion_tokens,
        )
        prompts = [list(p.token_ids) for p in prepared.prompts]
        max_tokens = [
            resolve_max_tokens(
                len(ids),
                form.max_completion_tokens,
                limits,
                "prompt",
                "max_completion_tokens",
            )
            for ids in prompts
        ]
        request_id = self.new_id(task)
        specs = sequence_specs(request_id, prompts, max_tokens, sampling, 0)
        for i, (spec, p) in enumerate(zip(specs, prepared.prompts, strict=True)):
            spec.mm_inputs = list(p.mm_inputs)
            log_request(
                self.config, f"{request_id}-{i}", p.text, spec.prompt_token_ids, sampling, None
            )
        lens = [len(p) for p in prompts]
        view = _View(self, form, task, request_id, model, prepared, lens, deadline)
        if form.stream:
            return await self.stream(raw, specs, deadline, arrival, view.render, view.finish)
        results = await self.collect(raw, specs, deadline, arrival)
        return await view.response([merge_deltas(r) for r in results])


def _sampling_fields(form: TranscriptionForm) -> SimpleNamespace:
    """The form as the sampling fields build_sampling reads (the rest at their defaults)."""
    return SimpleNamespace(
        temperature=form.temperature,
        top_p=form.top_p,
        top_k=form.top_k,
        min_p=form.min_p,
        presence_penalty=form.presence_penalty,
        frequency_penalty=form.frequency_penalty,
        repetition_penalty=form.repetition_penalty,
        seed=form.seed,
        min_tokens=0,
        stop_token_ids=None,
        ignore_eos=False,
        include_stop_str_in_output=False,
        logit_bias=None,
        skip_special_tokens=True,
        allowed_token_ids=None,
        bad_words=None,
    )


class _View:
    """One request's output: the joined text, vLLM's stream chunks, or verbose segments."""

    def __init__(
        self,
        serving: TranscriptionService,
        form: TranscriptionForm,
        task: str,
        request_id: str,
        model: str,
        prepared: tokenizer_pb2.PrepareResponse,
        prompt_lens: list[int],
        deadline: Deadline,
    ) -> None:
        self.serving = serving
        self.form = form
        self.task = task
        self.id = request_id
        self.model = model
        self.prepared = prepared
        self.created = int(time.time())
        self.object = "transcription.chunk" if task == "transcribe" else "translation.chunk"
        self.num_prompt = sum(prompt_lens)
        self.num_completion = 0
        self.next_chunk = 0
        """The audio chunk whose output streams now."""
        self.waiting: dict[int, list[SequenceDelta]] = {}
        """Output of later chunks, held until the earlier ones have finished."""
        self.deadline = deadline
        """The request's deadline, for verbose_json's tokenizer calls."""

    # ------------------------------------------------------------------ streaming

    def render(self, index: int, delta: SequenceDelta) -> Iterable[str]:
        self.waiting.setdefault(index, []).append(delta)
        out = []
        while self.next_chunk in self.waiting:
            deltas = self.waiting[self.next_chunk]
            while deltas:
                d = deltas.pop(0)
                out.append(self._chunk(d))
                if d.finish_reason is not None:
                    del self.waiting[self.next_chunk]
                    self.next_chunk += 1
                    break
            else:
                break
        return out

    def _chunk(self, d: SequenceDelta) -> str:
        self.num_completion += len(d.token_ids)
        choice: dict = {"delta": {"content": d.text}}
        if d.finish_reason is not None:
            choice["finish_reason"] = d.finish_reason
            choice["stop_reason"] = d.stop_reason
        payload = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.form.stream_continuous_usage_stats:
            payload["usage"] = self._usage()
        return sse(payload)

    def finish(self) -> Iterable[str]:
        if self.form.stream_include_usage:
            yield sse(
                {
                    "id": self.id,
                    "object": self.object,
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage(),
                }
            )

    def _usage(self) -> dict:
        return {
            "prompt_tokens": self.num_prompt,
            "completion_tokens": self.num_completion,
            "total_tokens": self.num_prompt + self.num_completion,
        }

    # ------------------------------------------------------------------ whole responses

    async def response(self, outputs: list[SequenceDelta]) -> Response:
        fmt = self.form.response_format
        if fmt == "verbose_json":
            return await self._verbose(outputs)
        text = "".join(o.text for o in outputs)
        if fmt == "text":
            return PlainTextResponse(text)
        body: dict = {"text": text}
        if self.task == "transcribe":
            # OpenAI's duration usage, whole seconds rounded up (vLLM does the same).
            body["usage"] = {"type": "duration", "seconds": math.ceil(self.prepared.audio_seconds)}
        return _json(body)

    async def _verbose(self, outputs: list[SequenceDelta]) -> Response:
        segments: list[dict] = []
        base = await self._timestamp_base()
        for out, prompt in zip(outputs, self.prepared.prompts, strict=True):
            for seg in split_segments(out, base, prompt.audio_start_seconds):
                seg["text"] = await self._decode(seg["tokens"])
                data = seg["text"].encode()
                seg["compression_ratio"] = len(data) / len(zlib.compress(data))
                seg.update(id=len(segments), temperature=self.form.temperature)
                segments.append(seg)
        return _json(
            {
                "text": "".join(s["text"] for s in segments),
                "language": self.form.language or "en",
                "duration": str(self.prepared.audio_seconds),
                "segments": segments,
            }
        )

    async def _timestamp_base(self) -> int:
        """The id of `<|0.00|>` (the tokenizer service checked the tokenizer has it)."""
        clients = self.serving.clients
        resp = await clients.tokenizer.Tokenize(
            tokenizer_pb2.TokenizeRequest(text="<|0.00|>", add_special_tokens=False),
            timeout=clients.call_timeout(self.deadline),
        )
        if len(resp.token_ids) != 1:
            raise bad_request("this model's tokenizer has no <|0.00|> token", "response_format")
        return resp.token_ids[0]

    async def _decode(self, ids: list[int]) -> str:
        clients = self.serving.clients
        resp = await clients.tokenizer.Detokenize(
            tokenizer_pb2.DetokenizeRequest(token_ids=ids, skip_special_tokens=True),
            timeout=clients.call_timeout(self.deadline),
        )
        return resp.text


def split_segments(out: SequenceDelta, base: int, start_s: float) -> list[dict]:
    """The segments of one chunk's tokens (vLLM's method): the sequence starts at `<|0.00|>`
    (the prompt's last token); a segment closes where a timestamp token follows another;
    a trailing lone timestamp closes the last one. Times are offsets of `start_s`;
    avg_logprob averages the segment's token logprobs."""
    tokens = list(out.token_ids)
    logprobs = [e.logprob for e in out.logprobs]
    if out.finish_reason == "stop" and tokens and not _is_ts(tokens[-1], base):
        tokens, logprobs = tokens[:-1], logprobs[:-1]  # the EOS that stopped it
    seq = [base, *tokens]
    lps = [0.0, *logprobs]
    if len(seq) >= 2 and not _is_ts(seq[-2], base) and _is_ts(seq[-1], base):
        seq.append(seq[-1])
        lps.append(0.0)
    segments, start, total = [], 0, 0.0
    for i in range(1, len(seq)):
        if _is_ts(seq[i], base) and _is_ts(seq[i - 1], base):
            piece = seq[start:i]
            segments.append(
                {
                    # Whisper's seek: the chunk's offset in mel frames (10 ms each).
                    "seek": round(start_s * 100),
                    "start": start_s + TIMESTAMP_STEP_S * (piece[0] - base),
                    "end": start_s + TIMESTAMP_STEP_S * (piece[-1] - base),
                    "tokens": piece[1:-1],
                    "avg_logprob": total / (i - start),
                    "no_speech_prob": None,
                }
            )
            start, total = i, 0.0
        else:
            total += lps[i]
    return segments


def _is_ts(token: int, base: int) -> bool:
    return base <= token <= base + 1500  # <|0.00|> .. <|30.00|>


def _json(body: dict) -> Response:
    import json

    return Response(json.dumps(body), media_type="application/json")
