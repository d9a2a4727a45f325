"""`LLM.embed`: vLLM's offline embeddings over an in-process engine with `runner="pooling"`.

llm = LLM("path/to/model", runner="pooling")
outs = llm.embed(["Hello", "World"])
outs[0].outputs.embedding  # list of floats
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.common import messages as msg
from splitserve.offline.prompts import as_batch, progress_bar, unpack_prompt_dict


@dataclass
class PoolingParams:
    """Per-request pooling options (vLLM's PoolingParams, the fields splitserve serves)."""

    dimensions: int | None = None
    """Keep the first `dimensions` values (matryoshka models only), then normalize."""
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens; -1 means the model's context length."""
    normalize: bool | None = None
    """L2-normalize the embedding; None follows the model's pooler."""


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding (vLLM's EmbeddingRequestOutput)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    num_cached_tokens: int = 0
    finished: bool = True


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: the context length)."""
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    if k < 1 or k > max_model_len:
        raise ValueError(
            f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}] (the maximum "
            f"context length), got {k}"
        )
    return ids[-k:]


def embed(
    llm,
    prompts,
    pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    truncate_prompt_tokens: int | None = None,
    use_tqdm: bool | Callable[..., Any] = True,
    lora_request=None,
) -> list[EmbeddingRequestOutput]:
    engine = llm.engine
    if engine.model_info.runner_info.runner != "pooling":
        raise ValueError(
            "LLM.embed needs a pooling model: create the LLM with runner='pooling' "
            "(this one runs the generate runner)"
        )
    batch = as_batch(prompts)
    params = PoolingParams() if pooling_params is None else pooling_params
    params_list = list(params) if isinstance(params, Sequence) else [params] * len(batch)
    if len(params_list) != len(batch):
        raise ValueError(f"{len(params_list)} pooling params for {len(batch)} prompts")
    loras = (
        list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(batch)
    )
    if len(loras) != len(batch):
        raise ValueError(f"{len(loras)} LoRA requests for {len(batch)} prompts")
    sched = engine.scheduler
    rids: list[str] = []
    ids_list: list[list[int]] = []
    for p, pp, lora in zip(batch, params_list, loras, strict=True):
        salt = ""
        if isinstance(p, dict):
            p, salt, mm_data = unpack_prompt_dict(p)
            if mm_data:
                raise ValueError(
                    "LLM.embed takes no multi_modal_data (the pooling runner is text-only)"
                )
        ids = llm.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        k = pp.truncate_prompt_tokens if pp.truncate_prompt_tokens is not None else None
        ids = truncate_prompt(
            ids, k if k is not None else truncate_prompt_tokens, llm.max_model_len
        )
        rid = f"llm-embed-{next(llm._ids)}"
        req = msg.GenerateRequest(
            request_id=rid,
            prompt_token_ids=list(ids),
            pooling=True,
            cache_salt=salt or "",
            dimensions=pp.dimensions,
            normalize=pp.normalize,
        )
        if lora is not None:
            req.lora_name, req.lora_path = lora.lora_name, str(lora.lora_path)
            req.lora_int_id = lora.lora_int_id
        try:
            sched.add_request(req)
        except Exception as exc:
            for r in rids:
                sched.abort_request(r)
            raise ValueError(getattr(exc, "message", str(exc))) from exc
        rids.append(rid)
        ids_list.append(ids)
    done: dict[str, Any] = {}
    bar = progress_bar(use_tqdm, len(rids))
    while engine.has_work:
        for out in engine.step():
            if out.error:
                for r in rids:
                    sched.abort_request(r)
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.finished:
                done[out.request_id] = out
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return [
        EmbeddingRequestOutput(
            request_id=str(i),
            prompt_token_ids=ids,
            outputs=EmbeddingOutput(list(done[rid].embedding)),
            num_cached_tokens=done[rid].num_cached_tokens,
        )
        for i, (rid, ids) in enumerate(zip(rids, ids_list, strict=True))
    ]
