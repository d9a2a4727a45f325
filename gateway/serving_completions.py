"""POST /v1/completions: prompts (text, token ids, or batches of either), echo, legacy logprobs,
streaming and not."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from splitserve.common.sampling_params import SamplingParams
from splitserve.gateway import vllm_extras
from splitserve.gateway.errors import bad_request
from splitserve.gateway.generation import Deadline, SequenceDelta, merge_deltas
from splitserve.gateway.logprobs import CompletionLogprobsBuilder, align_prompt_logprobs
from splitserve.gateway.logprobs import prompt_logprobs_vllm as vllm_prompt_logprobs
from splitserve.gateway.prepare import prepare, prompt_list
from splitserve.gateway.protocol import CompletionRequest, CompletionResponse
from splitserve.gateway.request_log import log_request
from splitserve.gateway.sampling import (
    Limits,
    build_sampling,
    check_n,
    check_stream_fields,
    check_token_ids,
    check_truncation,
    max_tokens_note,
    resolve_max_tokens,
    sequence_specs,
    stop_strings,
)
from splitserve.gateway.serving_base import ServingBase
from splitserve.gateway.streaming import TextChunkTemplate, sse
from splitserve.gateway.structured import Constraint, resolve_constraint
from splitserve.gateway.vllm_extras import refuse_unsupported
from splitserve.protos import common_pb2, tokenizer_pb2


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int]
    text: str | None  # known text, or None when only ids were given


class CompletionsService(ServingBase):
    """The legacy completions endpoint."""

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = await self.check_model(req.model)
        check_stream_fields(req)
        constraint = resolve_constraint(req)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        refuse_unsupported(req)
        response_id = vllm_extras.response_id("cmpl", req.request_id)
        limits = self.limits(req.model)
        n = check_n(req, limits)
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of other than n is not supported", "best_of")
        echo = bool(req.echo)
        engine_prompt_logprobs = req.prompt_logprobs
        if echo and req.logprobs is not None:
            engine_prompt_logprobs = max(engine_prompt_logprobs or 0, req.logprobs)
        sampling = build_sampling(
            req,
            limits,
            n=n,
            stop=stop_strings(req, limits),
            logprobs=req.logprobs,
            prompt_logprobs=engine_prompt_logprobs,
            max_tokens=req.max_tokens,
        )
        deadline = self.deadline()
        prompts, grammar = await self._prepare(req, limits, n, deadline, sampling, constraint)
        max_tokens = []
        # Without max_tokens: --max-tokens-default (16); the model's max_new_tokens caps it
        # and an explicit max_tokens alike (vLLM takes the least).
        cap = limits.defaults.max_tokens
        for p in prompts:
            max_tokens.append(
                resolve_max_tokens(
                    len(p.token_ids),
                    req.max_tokens,
                    limits,
                    "prompt",
                    default=limits.max_tokens_default,
                    cap=cap,
                )
            )
        request_id = self.new_id("cmpl")
        specs = sequence_specs(
            request_id,
            [p.token_ids for p in prompts],
            max_tokens,
            sampling,
            req.priority,
            grammar,
            req.cache_salt,
            max_tokens_note=max_tokens_note(req.max_tokens, cap),
        )
        self.attach_lora(specs, req.model)
        lora = specs[0].lora_name or None
        for i, p in enumerate(prompts):
            log_request(self.config, f"{request_id}-{i}", p.text, p.token_ids, sampling, lora)
        view = _CompletionView(self, req, response_id or request_id, model, prompts, n, arrival)
        if req.stream:
            return await self.stream(
                raw, specs, deadline, arrival, view.render_chunk, view.final_chunks
            )
        results = await self.collect(raw, specs, deadline, arrival)
        return Response(
            view.full_response(results).model_dump_json(), media_type="application/json"
        )

    async def _prepare(
        self,
        req: CompletionRequest,
        limits: Limits,
        n: int,
        deadline: Deadline,
        sampling: SamplingParams,
        constraint: Constraint | None,
    ) -> tuple[list[_Prompt], common_pb2.CompiledGrammar | None]:
        """The prompts' ids (and texts, for echo), bad words and the constraint compiled, in
        one tokenizer-service call, or none when the prompts are token ids and nothing else
        needs the tokenizer."""
        p = req.prompt
        if isinstance(p, str):
            items: list[Any] = [p]
        elif not p:
            raise bad_request("the prompt must not be empty", "prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        if len(items) * n > limits.max_n:
            raise bad_request(
                f"a request may run at most {limits.max_n} sequences (prompts x n), got "
                f"{len(items)} x {n}",
                "prompt",
            )
        for item in items:
            if len(item) == 0:
                raise bad_request("the prompt must not be empty", "prompt")
            if not isinstance(item, str):
                check_token_ids(item, limits, "prompt")
        keep = check_truncation(req.truncate_prompt_tokens, limits)
        if (
            constraint is None
            and not sampling.bad_words
            and not req.echo
            and keep is None
            and not any(isinstance(item, str) for item in items)
        ):
            # NOTE: token ids with nothing to tokenize, compile or decode: no round trip to
            # the tokenizer service before the first token (at most one call per request).
            return [_Prompt(list(item), None) for item in items], None
        request = tokenizer_pb2.PrepareRequest(
            prompts=prompt_list(items, req.add_special_tokens),
            # Echo shows the prompt: id-only and truncated prompts get their text decoded.
            return_prompt_text=bool(req.echo),
            lora_path=self.adapter_tokenizer(req.model),
        )
        if keep is not None:
            request.truncate_prompt_tokens = keep
        prepared = await prepare(
            self.clients, request, deadline, sampling=sampling, constraint=constraint
        )
        prompts = [
            _Prompt(list(r.token_ids), r.text if r.HasField("text") else None)
            for r in prepared.prompts
        ]
        return prompts, prepared.grammar if constraint is not None else None


class _CompletionView:
    """Turns sequence deltas into completion chunks or the full response, for one request."""

    def __init__(
        self,
        serving: CompletionsService,
        req: CompletionRequest,
        request_id: str,
        model: str,
        prompts: list[_Prompt],
        n: int,
        arrival: float,
    ) -> None:
        self.serving = serving
        self.clients = serving.clients
        self.req = req
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.prompts = prompts
        self.n = n
        self.arrival = arrival
        self.echo = bool(req.echo)
        self.return_token_ids = bool(req.return_token_ids)
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        self.plain_chunk = (
            None
            if self.return_token_ids or self.continuous_usage
            else TextChunkTemplate(
                self.id, "text_completion", self.created, model, self.include_usage
            )
        )
        """The chunk renderer for what most streams send: text only, no logprobs."""
        self.running_chunk = (
            self.plain_chunk.render_running
            if self.plain_chunk is not None and req.logprobs is None
            else None
        )
        """`plain_chunk`'s renderer of a chunk without finish, where every chunk uses it."""
        count = len(prompts) * n
        self.started = [False] * count
        self.num_tokens = [0] * count
        self.num_cached = [0] * count
        self.finish_reasons: list[str] = []
        self.builders = (
            [
                CompletionLogprobsBuilder(
                    self.clients,
                    req.logprobs,
                    serving.tokens_as_ids(req),
                    serving.adapter_tokenizer(req.model),
                )
                for _ in range(count)
            ]
            if req.logprobs is not None
            else None
        )

    def _prompt(self, index: int) -> _Prompt:
        return self.prompts[index // self.n]

    def _logprobs(self, index: int, delta: SequenceDelta, first: bool) -> dict | None:
        if self.builders is None:
            return None
        builder = self.builders[index]
        if first and self.echo:
            prompt = self._prompt(index)
            head = builder.build(
                prompt.token_ids, align_prompt_logprobs(prompt.token_ids, delta.prompt_logprobs)
            )
            tail = builder.build(delta.token_ids, delta.logprobs)
            return {k: head[k] + tail[k] for k in head}
        return builder.build(delta.token_ids, delta.logprobs)

    def _usage(
        self, prompt_tokens: int, completion_tokens: int, cached: int | None = None
    ) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self.serving.config.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {
                "cached_tokens": self._cached_tokens() if cached is None else cached
            }
        return usage

    def _cached_tokens(self) -> int:
        """Per prompt, what was cached before its n sequences started (the least any of them
        found: later ones also hit the blocks the first one wrote), summed over prompts."""
        n = self.n
        return sum(min(self.num_cached[i : i + n]) for i in range(0, len(self.num_cached), n))

    # ------------------------------------------------------------------ streaming

    def render_chunk(self, index: int, delta: SequenceDelta) -> Iterable[str]:
        if self.running_chunk is not None and delta.finish_reason is None and self.started[index]:
            # NOTE: the per-token path of a plain stream (no logprobs, token ids or running
            # usage; echo is in the first chunk): what the general path below renders.
            self.num_tokens[index] += len(delta.token_ids)
            if delta.num_cached_tokens > self.num_cached[index]:
                self.num_cached[index] = delta.num_cached_tokens
            text = delta.text
            return (self.running_chunk(index, text),) if text else ()
        first = not self.started[index]
        self.started[index] = True
        self.num_tokens[index] += len(delta.token_ids)
        self.num_cached[index] = max(self.num_cached[index], delta.num_cached_tokens)
        text = delta.text
        if first and self.echo:
            text = (self._prompt(index).text or "") + text
        logprobs = self._logprobs(index, delta, first)
        if delta.finish_reason is not None:
            self.finish_reasons.append(delta.finish_reason)
        elif (
            not text
            and not (logprobs and logprobs["tokens"])
            and not (self.return_token_ids and (first or delta.token_ids))
        ):
            return ()
        if logprobs is None and self.plain_chunk is not None:
            return (self.plain_chunk.render(index, text, delta.finish_reason, delta.stop_reason),)
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                    "stop_reason": delta.stop_reason,
                }
            ],
        }
        if self.return_token_ids:
            # vLLM's return_token_ids: the prompt's ids on a choice's first chunk, then the
            # ids each chunk adds.
            choice = chunk["choices"][0]
            if first:
                choice["prompt_token_ids"] = self._prompt(index).token_ids
            choice["token_ids"] = list(delta.token_ids)
        if self.include_usage:
            chunk["usage"] = (
                self._usage(
                    len(self._prompt(index).token_ids),
                    self.num_tokens[index],
                    self.num_cached[index],
                )
                if self.continuous_usage
                else None
            )
        return (sse(chunk),)

    def final_chunks(self) -> Iterable[str]:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(self.num_tokens)
        self.serving.metrics.record_finished(
            self.arrival, prompt_tokens, completion_tokens, self.finish_reasons
        )
        if not self.include_usage:
            return ()
        return (
            sse(
                {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage(prompt_tokens, completion_tokens),
                }
            ),
        )

    # ------------------------------------------------------------------ full response

    def full_response(self, results: list[list[SequenceDelta]]) -> CompletionResponse:
        choices = []
        for index, deltas in enumerate(results):
            prompt = self._prompt(index)
            merged = merge_deltas(deltas)
            self.num_tokens[index] = len(merged.token_ids)
            self.num_cached[index] = merged.num_cached_tokens
            self.finish_reasons.append(merged.finish_reason or "stop")
            text = ((prompt.text or "") if self.echo else "") + merged.text
            choice: dict[str, Any] = {
                "index": index,
                "text": text,
                "logprobs": self._logprobs(index, merged, True),
                "finish_reason": merged.finish_reason,
                "stop_reason": merged.stop_reason,
            }
            if self.return_token_ids:
                choice["prompt_token_ids"] = prompt.token_ids
                choice["token_ids"] = list(merged.token_ids)
            if self.req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(
                    self.clients, prompt.token_ids, merged.prompt_logprobs
                )
            choices.append(choice)
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(self.num_tokens)
        self.serving.metrics.record_finished(
            self.arrival, prompt_tokens, completion_tokens, self.finish_reasons
        )
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(prompt_tokens, completion_tokens),
        )
