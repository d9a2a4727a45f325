"""POST /v1/embeddings (OpenAI's shape, with vLLM's extensions) for a server started with
--runner pooling.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists
(vLLM also takes chat `messages` instead, rendered with the chat template). Every input is one
prompt-only scheduler request whose last message carries the embedding, already pooled,
truncated to `dimensions` and normalized as the model's pooler says.
`encoding_format` "base64" sends each vector as little-endian float32 bytes (what the OpenAI
client asks for by default).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Literal

import grpc
import numpy as np
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from splitserve.common.pooling import dimensions_problem
from splitserve.gateway.clients import SCHEDULER
from splitserve.gateway.errors import bad_request
from splitserve.gateway.generation import Deadline
from splitserve.gateway.prepare import chat_input, prepare, prompt_list
from splitserve.gateway.protocol import ChatMessage, Int, PromptInput, RequestModel
from splitserve.gateway.sampling import Limits, check_token_ids
from splitserve.gateway.serving_base import ServingBase
from splitserve.gateway.streaming import run_until_disconnect
from splitserve.protos import scheduler_pb2, tokenizer_pb2

MAX_INPUTS = 2048
"""Most inputs one request may embed (OpenAI's own cap per request)."""


class EmbeddingRequest(RequestModel):
    """POST /v1/embeddings: OpenAI's fields plus vLLM's (truncate_prompt_tokens, messages)."""

    model: str | None = None
    input: PromptInput | None = None
    messages: list[ChatMessage] | None = None
    """vLLM's chat-style input, instead of `input`: rendered with the chat template."""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None
    """Accepted and ignored, as OpenAI does."""
    truncate_prompt_tokens: Int | None = None
    normalize: bool | None = None
    """L2-normalize the embeddings (vLLM); unset follows the model's pooler."""
    """Keep only the last k tokens of each input; -1 means the context length (vLLM)."""
    add_special_tokens: bool | None = None
    """Add BOS etc. when tokenizing text; default true for `input`, false for `messages`."""
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    priority: Int = 0


class EmbeddingData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class EmbeddingsService(ServingBase):
    """The embeddings endpoint; refused unless the workers run the pooling runner."""

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = await self.check_model(req.model)
        info = self.clients.model_info.runner_info
        if info.runner != "pooling":
            raise bad_request(
                f"The model `{model}` does not support Embeddings API: it runs with --runner "
                f"{info.runner or 'generate'} (serve it with --runner pooling)",
                "model",
            )
        if req.dimensions is not None:
            problem = dimensions_problem(
                req.dimensions,
                f"Model {model!r}",
                info.is_matryoshka,
                list(info.matryoshka_dimensions),
                info.hidden_size,
            )
            if problem:
                raise bad_request(problem, "dimensions")
        limits = self.limits()
        deadline = self.deadline()
        prompts = await self._prompts(req, limits, deadline)
        request_id = self.new_id("embd")
        vectors = await run_until_disconnect(
            raw,
            asyncio.gather(
                *(
                    self._embed(f"{request_id}-{i}", ids, req, deadline)
                    for i, ids in enumerate(prompts)
                )
            ),
        )
        data = [
            EmbeddingData(index=i, embedding=_encode(vec, req.encoding_format))
            for i, vec in enumerate(vectors)
        ]
        used = sum(len(p) for p in prompts)
        # As vLLM: prompt tokens and one successful request ("stop") per input.
        self.metrics.record_finished(arrival, used, 0, ["stop"] * len(prompts))
        body = EmbeddingResponse(
            id=request_id,
            created=int(time.time()),
            model=model,
            data=data,
            usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _prompts(
        self, req: EmbeddingRequest, limits: Limits, deadline: Deadline
    ) -> list[list[int]]:
        """Token ids of every input (one tokenizer-service call), checked against the
        vocabulary and the context."""
        if (req.input is None) == (req.messages is None):
            raise bad_request("give exactly one of input and messages", "input")
        if req.messages is not None:
            chat = await chat_input(
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template=None,
                chat_template_kwargs=req.chat_template_kwargs,
                tools=None,
            )
            request, param = tokenizer_pb2.PrepareRequest(chat=chat), "messages"
        else:
            items = self._input_items(req, limits)
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            request = tokenizer_pb2.PrepareRequest(prompts=prompt_list(items, add_special))
            param = "input"
        k = req.truncate_prompt_tokens
        if k is not None:
            if k == -1:
                k = limits.max_model_len
            if not 1 <= k <= limits.max_model_len:
                raise bad_request(
                    f"truncate_prompt_tokens must be -1 or in [1, {limits.max_model_len}], "
                    f"got {req.truncate_prompt_tokens}",
                    "truncate_prompt_tokens",
                )
            request.truncate_prompt_tokens = k
        prepared = await prepare(self.clients, request, deadline, prompt_param="input")
        prompts = [list(p.token_ids) for p in prepared.prompts]
        for i, ids in enumerate(prompts):
            if not ids:
                raise bad_request(f"input {i} has no tokens", param)
            if len(ids) > limits.max_model_len:
                raise bad_request(
                    f"This model's maximum context length is {limits.max_model_len} tokens, "
                    f"but input {i} has {len(ids)} tokens; shorten it or set "
                    "truncate_prompt_tokens",
                    param,
                )
        return prompts

    @staticmethod
    def _input_items(req: EmbeddingRequest, limits: Limits) -> list[Any]:
        """`input` as a list of prompts (each text or token ids), checked."""
        p = req.input
        if isinstance(p, str):
            items: list[Any] = [p]
        elif not p:
            raise bad_request("input must not be empty", "input")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        if len(items) > MAX_INPUTS:
            raise bad_request(
                f"a request may embed at most {MAX_INPUTS} inputs, got {len(items)}", "input"
            )
        for item in items:
            if len(item) == 0:
                raise bad_request("input must not hold an empty string or list", "input")
            if not isinstance(item, str):
                check_token_ids(item, limits, "input")
        return items

    async def _embed(
        self, request_id: str, ids: list[int], req: EmbeddingRequest, deadline: Deadline
    ) -> list[float]:
        """One prompt-only scheduler request; cancelling it aborts the request there."""
        message = scheduler_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=ids, pooling=True, priority=req.priority
        )
        if req.dimensions is not None:
            message.dimensions = req.dimensions
        if req.normalize is not None:
            message.normalize = req.normalize
        adapter = self.loras.get(req.model)
        if adapter is not None:  # the model names a LoRA adapter: embed through it
            message.lora_name = adapter.name  # the scheduler resolves it (see attach_lora)
        message.heartbeat_interval_s = self.clients.heartbeat_interval_s
        embedding: list[float] | None = None
        call = self.clients.scheduler.Generate(message, timeout=deadline.remaining())
        try:
            while (resp := await self.clients.read_stream(call, SCHEDULER)) is not grpc.aio.EOF:
                if resp.embedding:
                    embedding = list(resp.embedding)
        except BaseException:
            call.cancel()  # the scheduler aborts the request
            raise
        if embedding is None:
            raise RuntimeError(f"the scheduler finished {request_id} without an embedding")
        return embedding


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
