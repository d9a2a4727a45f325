"""POST /v1/chat/completions: messages rendered by the tokenizer service's chat template (in
the request's one Prepare call, with its bad words and constraint),
chat-format logprobs, streaming (role in the first delta) and not."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from splitserve.gateway import vllm_extras
from splitserve.gateway.chat_output import ChoiceOutput
from splitserve.gateway.errors import bad_request
from splitserve.gateway.generation import SequenceDelta, merge_deltas
from splitserve.gateway.logprobs import chat_logprobs, prompt_logprobs_vllm
from splitserve.gateway.prepare import chat_input, prepare
from splitserve.gateway.protocol import ChatCompletionRequest, ChatCompletionResponse
from splitserve.gateway.request_log import log_request
from splitserve.gateway.sampling import (
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
from splitserve.gateway.streaming import ChatContentChunkTemplate, sse
from splitserve.gateway.structured import resolve_constraint
from splitserve.gateway.tool_calls import ToolCallParser, ToolMode, tool_constraint
from splitserve.gateway.tool_parsers import TOOL_PARSERS
from splitserve.gateway.vllm_extras import refuse_unsupported
from splitserve.protos import tokenizer_pb2


class ChatService(ServingBase):
    """The chat completions endpoint."""

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = await self.check_model(req.model)
        check_stream_fields(req)
        refuse_unsupported(req)
        response_id = vllm_extras.response_id("chatcmpl", req.request_id)
        config = self.config
        auto_parser = config.tool_call_parser if config.enable_auto_tool_choice else None
        tool = tool_constraint(req.tools, req.tool_choice, req.parallel_tool_calls, auto_parser)
        tool_mode = tool[0] if tool is not None else None
        constraint = resolve_constraint(req, [tool[1]] if tool is not None else None)
        # tool_choice "auto" reads calls out of the free output; a constrained output (forced
        # calls, response_format) has no <think> part, so it is not split for reasoning.
        auto = tool is None and bool(req.tools) and req.tool_choice in (None, "auto")
        parse_tools = auto_parser if auto else None
        parse_reasoning = config.reasoning_parser if constraint is None else None
        if parse_tools is not None and TOOL_PARSERS[parse_tools].special_start_tag:
            # The call tag is a special token (Mistral's [TOOL_CALLS]): keep it in the text.
            req.skip_special_tokens = False
        if tool_mode is not None and req.echo:
            raise bad_request(
                "echo cannot be combined with forced tool calls (tool_choice 'required' or a "
                "named function)",
                "echo",
            )
        limits = self.limits(req.model)
        n = check_n(req, limits)
        top = req.top_logprobs
        if top is not None:
            if top < 0 or top > limits.max_logprobs:
                raise bad_request(
                    f"top_logprobs must be between 0 and {limits.max_logprobs}, got {top}",
                    "top_logprobs",
                )
            if top > 0 and not req.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_param = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        user_max = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        sampling = build_sampling(
            req,
            limits,
            n=n,
            stop=stop_strings(req, limits),
            logprobs=(top or 0) if req.logprobs else None,
            prompt_logprobs=req.prompt_logprobs,
            max_tokens=user_max,
            aliases={"max_tokens": max_param, "logprobs": "top_logprobs"},
        )
        deadline = self.deadline()
        chat = await chat_input(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            tools=req.tools,
            documents=req.documents,
            config=config,
        )
        prepare_request = tokenizer_pb2.PrepareRequest(
            chat=chat, lora_path=self.adapter_tokenizer(req.model)
        )
        keep = check_truncation(req.truncate_prompt_tokens, limits)
        if keep is not None:
            if chat.images:
                raise bad_request(
                    "truncate_prompt_tokens cannot be combined with images: truncation would "
                    "cut into an image's placeholder tokens",
                    "truncate_prompt_tokens",
                )
            prepare_request.truncate_prompt_tokens = keep
        # One tokenizer-service call: template, tokens, bad words and the constraint compiled.
        prepared = await prepare(
            self.clients, prepare_request, deadline, sampling=sampling, constraint=constraint
        )
        (rendered,) = prepared.prompts
        ids = list(rendered.token_ids)
        check_token_ids(ids, limits, "messages")
        cap = limits.defaults.max_tokens
        max_tokens = resolve_max_tokens(len(ids), user_max, limits, "messages", max_param, cap=cap)
        request_id = self.new_id("chatcmpl")
        specs = sequence_specs(
            request_id,
            [ids],
            [max_tokens],
            sampling,
            req.priority,
            prepared.grammar if constraint is not None else None,
            req.cache_salt,
            max_tokens_note=max_tokens_note(user_max, cap),
        )
        self.attach_lora(specs, req.model)
        text = rendered.text if rendered.HasField("text") else None
        log_request(self.config, request_id, text, ids, sampling, specs[0].lora_name or None)
        for spec in specs:
            spec.mm_inputs = list(rendered.mm_inputs)
        echo = ""
        last = req.messages[-1]
        if req.echo and last.role == "assistant" and isinstance(last.content, str):
            echo = last.content
        view = _ChatView(
            self, req, response_id or request_id, model, ids, n, arrival, echo, tool_mode
        )
        if parse_tools or parse_reasoning:
            view.outputs = [
                ChoiceOutput(
                    parse_reasoning,
                    parse_tools,
                    parallel_tool_calls=req.parallel_tool_calls is not False,
                    include_reasoning=req.include_reasoning,
                )
                for _ in range(n)
            ]
        if req.stream:
            return await self.stream(
                raw, specs, deadline, arrival, view.render_chunk, view.final_chunks
            )
        results = await self.collect(raw, specs, deadline, arrival)
        return Response(
            view.full_response(results).model_dump_json(), media_type="application/json"
        )


class _ChatView:
    """Turns sequence deltas into chat chunks or the full response, for one request."""

    def __init__(
        self,
        serving: ChatService,
        req: ChatCompletionRequest,
        request_id: str,
        model: str,
        prompt_ids: list[int],
        n: int,
        arrival: float,
        echo: str,
        tool_mode: ToolMode | None = None,
    ) -> None:
        self.serving = serving
        self.clients = serving.clients
        self.req = req
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.arrival = arrival
        self.echo = echo
        # As vLLM: --response-role when a new turn is generated, else the turn being continued.
        self.role = (
            serving.config.response_role if req.add_generation_prompt else req.messages[-1].role
        )
        self.top_n = req.top_logprobs or 0
        self.want_logprobs = bool(req.logprobs)
        self.as_ids = serving.tokens_as_ids(req)
        self.lora_path = serving.adapter_tokenizer(req.model)
        """The adapter folder whose own tokenizer names logprob tokens; "" for the model's."""
        self.return_token_ids = bool(req.return_token_ids)
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        self.started = [False] * n
        self.num_tokens = [0] * n
        self.num_cached = [0] * n
        self.finish_reasons: list[str] = []
        # With forced tool calls the output is read as calls, not content.
        self.tool_mode = tool_mode
        self.parsers = [ToolCallParser(tool_mode) for _ in range(n)] if tool_mode else None
        # With --reasoning-parser or tool_choice "auto": each choice's own output parsers.
        self.outputs: list[ChoiceOutput] | None = None
        self.content_chunk = (
            None
            if self.want_logprobs or self.return_token_ids or self.continuous_usage or tool_mode
            else ChatContentChunkTemplate(self.id, self.created, model, self.include_usage)
        )
        """The renderer of what most chunks of a plain stream are: content, nothing else."""

    def _usage(self, completion_tokens: int, cached: int | None = None) -> dict[str, Any]:
        p = len(self.prompt_ids)
        usage: dict[str, Any] = {
            "prompt_tokens": p,
            "completion_tokens": completion_tokens,
            "total_tokens": p + completion_tokens,
        }
        if self.serving.config.enable_prompt_tokens_details:
            # What was cached before the n sequences started: the least any of them found.
            usage["prompt_tokens_details"] = {
                "cached_tokens": min(self.num_cached) if cached is None else cached
            }
        return usage

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: dict | None,
        finish_reason: str | None,
        stop_reason: int | str | None,
        token_ids: Sequence[int] | None = None,
    ) -> str:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.return_token_ids:
            # vLLM's return_token_ids: the prompt's ids on the first chunk of each choice,
            # then every chunk carries the ids it adds.
            choice["token_ids"] = list(token_ids or ())
            if delta.get("role"):
                chunk["prompt_token_ids"] = self.prompt_ids
        if self.include_usage:
            chunk["usage"] = (
                self._usage(self.num_tokens[index], self.num_cached[index])
                if self.continuous_usage
                else None
            )
        return sse(chunk)

    def _account(self, index: int, delta: SequenceDelta) -> dict | None:
        """Count the delta's tokens and prefix-cache hits; its logprobs in chat form (None
        when the request did not ask for them)."""
        self.num_tokens[index] += len(delta.token_ids)
        self.num_cached[index] = max(self.num_cached[index], delta.num_cached_tokens)
        if self.want_logprobs and delta.logprobs:
            return {
                "content": chat_logprobs(
                    self.clients, delta.logprobs, self.top_n, self.as_ids, self.lora_path
                )
            }
        return None

    def _role_chunk(self, index: int, content: str | None) -> str:
        return self._chunk(index, {"role": self.role, "content": content}, None, None, None)

    def render_chunk(self, index: int, delta: SequenceDelta) -> Iterable[str]:
        if (
            self.content_chunk is not None
            and self.outputs is None
            and delta.finish_reason is None
            and self.started[index]
        ):
            # NOTE: the per-token path of a plain stream: what the general path below renders
            # for a choice that goes on (its role chunk and echo came with its first delta).
            self.num_tokens[index] += len(delta.token_ids)
            if delta.num_cached_tokens > self.num_cached[index]:
                self.num_cached[index] = delta.num_cached_tokens
            text = delta.text
            return (self.content_chunk.render(index, text),) if text else ()
        if self.parsers is not None:
            return self._render_tool_chunk(index, delta)
        if self.outputs is not None:
            return self._render_parsed_chunk(index, delta)
        out = []
        text = delta.text
        if not self.started[index]:
            self.started[index] = True
            out.append(self._role_chunk(index, ""))
            text = self.echo + text
        logprobs = self._account(index, delta)
        ids = delta.token_ids
        if delta.finish_reason is not None:
            self.finish_reasons.append(delta.finish_reason)
            out.append(
                self._chunk(
                    index,
                    {"content": text} if text else {},
                    logprobs,
                    delta.finish_reason,
                    delta.stop_reason,
                    ids,
                )
            )
        elif text or logprobs or (self.return_token_ids and ids):
            out.append(self._chunk(index, {"content": text}, logprobs, None, None, ids))
        return out

    def _render_tool_chunk(self, index: int, delta: SequenceDelta) -> Iterable[str]:
        out = []
        if not self.started[index]:
            self.started[index] = True
            out.append(self._role_chunk(index, None))
        logprobs = self._account(index, delta)
        parser = self.parsers[index]
        calls = parser.feed(delta.text)
        body = {"tool_calls": calls} if calls else {}
        if delta.finish_reason is not None:
            calls.extend(parser.finish())
            body = {"tool_calls": calls} if calls else {}
            reason = _tool_finish_reason(parser, delta.finish_reason)
            self.finish_reasons.append(reason)
            out.append(
                self._chunk(index, body, logprobs, reason, delta.stop_reason, delta.token_ids)
            )
        elif body or logprobs or (self.return_token_ids and delta.token_ids):
            out.append(self._chunk(index, body, logprobs, None, None, delta.token_ids))
        return out

    def _render_parsed_chunk(self, index: int, delta: SequenceDelta) -> Iterable[str]:
        out = []
        body = self.outputs[index].feed(delta.text, final=delta.finish_reason is not None)
        if not self.started[index]:
            self.started[index] = True
            out.append(self._role_chunk(index, ""))
            if self.echo:
                body["content"] = self.echo + body.get("content", "")
        logprobs = self._account(index, delta)
        if delta.finish_reason is not None:
            reason = _parsed_finish_reason(self.outputs[index], delta.finish_reason)
            self.finish_reasons.append(reason)
            out.append(
                self._chunk(index, body, logprobs, reason, delta.stop_reason, delta.token_ids)
            )
        elif body or logprobs or (self.return_token_ids and delta.token_ids):
            out.append(self._chunk(index, body, logprobs, None, None, delta.token_ids))
        return out

    def final_chunks(self) -> Iterable[str]:
        completion_tokens = sum(self.num_tokens)
        self.serving.metrics.record_finished(
            self.arrival, len(self.prompt_ids), completion_tokens, self.finish_reasons
        )
        if not self.include_usage:
            return ()
        return (
            sse(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage(completion_tokens),
                }
            ),
        )

    def full_response(self, results: list[list[SequenceDelta]]) -> ChatCompletionResponse:
        choices = []
        prompt_lps = None
        for index, deltas in enumerate(results):
            merged = merge_deltas(deltas)
            self.num_tokens[index] = len(merged.token_ids)
            self.num_cached[index] = merged.num_cached_tokens
            self.finish_reasons.append(merged.finish_reason or "stop")
            logprobs = None
            if self.want_logprobs:
                logprobs = {
                    "content": chat_logprobs(
                        self.clients, merged.logprobs, self.top_n, self.as_ids, self.lora_path
                    )
                }
            if prompt_lps is None and self.req.prompt_logprobs is not None:
                prompt_lps = prompt_logprobs_vllm(
                    self.clients, self.prompt_ids, merged.prompt_logprobs
                )
            message: dict[str, Any] = {"role": self.role, "content": self.echo + merged.text}
            finish_reason = merged.finish_reason
            if self.parsers is not None:
                parser = self.parsers[index]
                parser.feed(merged.text)
                parser.finish()
                calls = parser.calls()
                if calls:
                    message = {"role": self.role, "content": None, "tool_calls": calls}
                finish_reason = _tool_finish_reason(parser, finish_reason)
                self.finish_reasons[-1] = finish_reason or "stop"
            elif self.outputs is not None:
                output = self.outputs[index]
                output.feed(merged.text, final=True)
                message = {**output.message(self.echo), "role": self.role}
                finish_reason = _parsed_finish_reason(output, finish_reason)
                self.finish_reasons[-1] = finish_reason or "stop"
            choice = {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": merged.stop_reason,
            }
            if self.return_token_ids:
                choice["token_ids"] = list(merged.token_ids)
            choices.append(choice)
        completion_tokens = sum(self.num_tokens)
        self.serving.metrics.record_finished(
            self.arrival, len(self.prompt_ids), completion_tokens, self.finish_reasons
        )
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(completion_tokens),
            prompt_logprobs=prompt_lps,
            prompt_token_ids=self.prompt_ids if self.return_token_ids else None,
        )


def _tool_finish_reason(parser: ToolCallParser, finish_reason: str | None) -> str | None:
    """ "tool_calls" when the constrained output ended cleanly and parsed as calls."""
    if finish_reason == "stop" and parser.complete:
        return "tool_calls"
    return finish_reason


def _parsed_finish_reason(output: ChoiceOutput, finish_reason: str | None) -> str | None:
    """ "tool_calls" when calls were read out of an output that ended normally."""
    if finish_reason == "stop" and output.has_calls:
        return "tool_calls"
    return finish_reason
