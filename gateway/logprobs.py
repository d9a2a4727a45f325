"""Logprobs in the OpenAI formats, with token strings from the gateway's DecodeEach cache."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from splitserve.gateway.clients import ServiceClients
from splitserve.protos import common_pb2

_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report this floor instead.

TokenLogprobs = common_pb2.TokenLogprobs


def token_strings(clients: ServiceClients, as_ids: bool = False, lora_path: str = ""):
    """token id -> (text, bytes): the decoded token (by the tokenizer of the adapter folder
    `lora_path` when it has its own), or vLLM's "token_id:N" form when
    return_tokens_as_token_ids asks for it."""
    if not as_ids:
        return functools.partial(clients.token_string, lora_path=lora_path)

    def as_id(token_id: int) -> tuple[str, bytes]:
        text = f"token_id:{token_id}"
        return text, text.encode()

    return as_id


def clamp(logprob: float) -> float:
    return _FLOOR if math.isnan(logprob) or logprob < _FLOOR else logprob


def align_prompt_logprobs(
    prompt_ids: Sequence[int], entries: Sequence[TokenLogprobs] | None
) -> list[TokenLogprobs | None]:
    """One slot per prompt token; the first position has no logprob."""
    n = len(prompt_ids)
    entries = list(entries or [])
    if len(entries) >= n:
        entries = entries[len(entries) - n + 1 :]
    slots: list[TokenLogprobs | None] = [None] * (n - len(entries))
    return slots + entries


class CompletionLogprobsBuilder:
    """The legacy {tokens, token_logprobs, top_logprobs, text_offset} format, built
    incrementally so streamed chunks and the full response agree on text offsets."""

    __slots__ = ("_lookup", "_top_n", "offset")

    def __init__(
        self, clients: ServiceClients, top_n: int, as_ids: bool = False, lora_path: str = ""
    ) -> None:
        self._lookup = token_strings(clients, as_ids, lora_path)
        self._top_n = top_n
        self.offset = 0

    def build(
        self, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None]
    ) -> dict[str, list[Any]]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        lookup = self._lookup
        for token_id, entry in zip(token_ids, entries, strict=False):
            text = lookup(token_id)[0]
            tokens.append(text)
            text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            lp = clamp(entry.logprob)
            token_logprobs.append(lp)
            # vLLM: the chosen token first, then the top-k, at most k + 1 distinct strings.
            top = {text: lp}
            limit = self._top_n + 1
            for tid, tlp in zip(entry.top_token_ids, entry.top_logprobs, strict=False):
                if len(top) >= limit:
                    break
                top.setdefault(lookup(tid)[0], clamp(tlp))
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def chat_logprobs(
    clients: ServiceClients,
    entries: Sequence[TokenLogprobs],
    top_n: int,
    as_ids: bool = False,
    lora_path: str = "",
) -> list[dict[str, Any]]:
    """Chat format: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    out = []
    lookup = token_strings(clients, as_ids, lora_path)
    for entry in entries:
        text, raw = lookup(entry.token_id)
        tops = []
        for tid, tlp in zip(entry.top_token_ids[:top_n], entry.top_logprobs[:top_n], strict=False):
            ttext, traw = lookup(tid)
            tops.append({"token": ttext, "logprob": clamp(tlp), "bytes": list(traw)})
        out.append(
            {
                "token": text,
                "logprob": clamp(entry.logprob),
                "bytes": list(raw),
                "top_logprobs": tops,
            }
        )
    return out


def prompt_logprobs_vllm(
    clients: ServiceClients, prompt_ids: Sequence[int], entries: Sequence[TokenLogprobs] | None
) -> list[dict | None]:
    """vLLM's prompt_logprobs: per position None or {token_id: {logprob, rank, decoded_token}}."""
    out: list[dict | None] = []
    lookup = clients.token_string
    for entry in align_prompt_logprobs(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        d = {
            str(entry.token_id): {
                "logprob": clamp(entry.logprob),
                "rank": entry.rank or None,
                "decoded_token": lookup(entry.token_id)[0],
            }
        }
        for rank, (tid, tlp) in enumerate(
            zip(entry.top_token_ids, entry.top_logprobs, strict=False), start=1
        ):
            d.setdefault(
                str(tid), {"logprob": clamp(tlp), "rank": rank, "decoded_token": lookup(tid)[0]}
            )
        out.append(d)
    return out
