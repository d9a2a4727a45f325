"""Request checks and sampling parameters shared by completions and chat completions.

Every check raises a 400 `RequestError` naming the offending field (prompt, token ids,
max_tokens, context length, sampling ranges, logprobs, n and stop caps); the model limits
(context length, vocabulary, logprobs cap) are the ones the scheduler reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

from splitserve.common.generation_config import SamplingDefaults
from splitserve.common.sampling_params import SamplingParams, validate
from splitserve.gateway import vllm_extras
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.errors import bad_request
from splitserve.gateway.generation import SequenceSpec
from splitserve.gateway.protocol import SamplingFields
from splitserve.protos import common_pb2

_INT64_MIN, _INT64_SPAN = -(2**63), 2**64
_LOGIT_BIAS_LIMIT = 100.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What a request may ask for: the model's facts and the server's caps."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_n: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_tokens_default: int
    defaults: SamplingDefaults = SamplingDefaults()
    """The model's defaults for the sampling fields a request leaves unset."""

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        vocab_size: int,
        max_model_len: int,
        engine_max_logprobs: int = 0,
        defaults: SamplingDefaults | None = None,
    ) -> Limits:
        max_logprobs = config.max_logprobs
        if engine_max_logprobs > 0:
            max_logprobs = min(max_logprobs, engine_max_logprobs)
        return cls(
            vocab_size,
            max_model_len,
            max_logprobs,
            config.max_n,
            config.max_stop_strings,
            config.max_stop_string_chars,
            config.max_tokens_default,
            defaults if defaults is not None else SamplingDefaults(),
        )


def check_stream_fields(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    if req.stream and req.prompt_logprobs is not None:
        raise bad_request(
            "prompt_logprobs are not available when stream is true", "prompt_logprobs"
        )


def check_n(req: SamplingFields, limits: Limits) -> int:
    n = 1 if req.n is None else req.n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}", "n")
    if n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n}, got {n}", "n")
    return n


def stop_strings(req: SamplingFields, limits: Limits) -> list[str]:
    stop = req.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > limits.max_stop_strings:
        raise bad_request(
            f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)}", "stop"
        )
    for s in stops:
        if not s:
            raise bad_request("stop strings must not be empty", "stop")
        if len(s) > limits.max_stop_string_chars:
            raise bad_request(
                f"stop strings must be at most {limits.max_stop_string_chars} "
                f"characters, got one of {len(s)}",
                "stop",
            )
    return list(dict.fromkeys(stops))


def logit_bias(req: SamplingFields, limits: Limits) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids, got {key[:40]!r}", "logit_bias"
            ) from None
        if not 0 <= token_id < limits.vocab_size:
            raise bad_request(
                f"logit_bias token id {token_id} is outside the vocabulary "
                f"[0, {limits.vocab_size})",
                "logit_bias",
            )
        out[token_id] = max(-_LOGIT_BIAS_LIMIT, min(_LOGIT_BIAS_LIMIT, value))
    return out


def check_token_ids(ids: list[int], limits: Limits, param: str) -> None:
    """Every id must be a row of the embedding."""
    vocab = limits.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", param)


def check_truncation(truncate_prompt_tokens: int | None, limits: Limits) -> int | None:
    """truncate_prompt_tokens checked against the context (a 400 outside [1, max_model_len]);
    the tokenizer service keeps that many last tokens of each prompt."""
    if truncate_prompt_tokens is None:
        return None
    if not 1 <= truncate_prompt_tokens <= limits.max_model_len:
        raise bad_request(
            f"truncate_prompt_tokens must be in [1, {limits.max_model_len}], "
            f"got {truncate_prompt_tokens}",
            "truncate_prompt_tokens",
        )
    return truncate_prompt_tokens


def resolve_max_tokens(
    prompt_len: int,
    max_tokens: int | None,
    limits: Limits,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
    default: int | None = None,
    cap: int | None = None,
) -> int:
    """Check the prompt and max_tokens against the context; None means `default`, capped by
    the rest of the context (the rest of it when `default` is None). `cap` (the model's
    max_new_tokens) bounds the result either way, as vLLM takes the least of them."""
    resolved = _resolve_max_tokens(
        prompt_len, max_tokens, limits, prompt_param, max_tokens_param, default
    )
    return resolved if cap is None else min(resolved, cap)


def max_tokens_note(requested: int | None, cap: int | None) -> str:
    """Where a max_tokens the client did not write came from, for error messages."""
    if requested is None:
        return " (the default, as the request gives no max_tokens)"
    if cap is not None and cap < requested:
        return " (the model's max_new_tokens, which caps every request)"
    return ""


def _resolve_max_tokens(
    prompt_len: int,
    max_tokens: int | None,
    limits: Limits,
    prompt_param: str,
    max_tokens_param: str,
    default: int | None,
) -> int:
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(
            f"{max_tokens_param} must be at least 1, got {max_tokens}", max_tokens_param
        )
    ctx = limits.max_model_len
    if prompt_len == 0:
        raise bad_request("the prompt must not be empty", prompt_param)
    if prompt_len >= ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has "
            f"{prompt_len} tokens, leaving no room to generate. Please reduce the length of "
            f"the prompt.",
            prompt_param,
        )
    if max_tokens is None:
        return ctx - prompt_len if default is None else min(default, ctx - prompt_len)
    if prompt_len + max_tokens > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in "
            f"the completion). Please reduce the length of the prompt or {max_tokens_param}.",
            max_tokens_param,
        )
    return max_tokens


def build_sampling(
    req: SamplingFields,
    limits: Limits,
    *,
    n: int,
    stop: list[str],
    logprobs: int | None,
    prompt_logprobs: int | None,
    max_tokens: int | None,
    aliases: dict[str, str] | None = None,
) -> SamplingParams:
    """Validated SamplingParams from the request (max_tokens is checked per prompt later)."""
    # A field the request leaves unset takes the model's default (generation_config.json),
    # else splitserve's own; an explicit value, 0 or -1 included, always wins.
    d = limits.defaults
    fields = dict(
        n=n,
        temperature=_first(req.temperature, d.temperature, 1.0),
        top_p=_first(req.top_p, d.top_p, 1.0),
        top_k=_first(req.top_k, d.top_k, 0),
        min_p=_first(req.min_p, d.min_p, 0.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=_first(req.repetition_penalty, d.repetition_penalty, 1.0),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=list(dict.fromkeys(req.stop_token_ids or [])),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias(req, limits),
        skip_special_tokens=req.skip_special_tokens,
        allowed_token_ids=vllm_extras.allowed_token_ids(req.allowed_token_ids),
        bad_words=vllm_extras.check_bad_words(req.bad_words),
    )
    errors = validate(
        SimpleNamespace(**fields), max_logprobs=limits.max_logprobs, vocab_size=limits.vocab_size
    )
    if errors:
        param, message = errors[0]
        if aliases and param in aliases:
            # The user's name for the field (e.g. chat's max_completion_tokens).
            message = message.replace(param, aliases[param], 1)
            param = aliases[param]
        raise bad_request(message, param)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if not math.isfinite(fields[name]):
            raise bad_request(f"{name} must be finite", name)
    return SamplingParams(**fields)


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def sequence_specs(
    request_id: str,
    prompts: list[list[int]],
    max_tokens: list[int],
    sampling: SamplingParams,
    priority: int,
    grammar: common_pb2.CompiledGrammar | None = None,
    cache_salt: str | None = None,
    max_tokens_note: str = "",
) -> list[SequenceSpec]:
    """prompt_index * n + i for every prompt and every i < n; with a seed, sequence i uses
    seed + i, so the n sequences differ yet are reproducible. Every sequence carries the
    request's constraint and cache salt."""
    specs = []
    n = sampling.n
    want_logprobs = sampling.logprobs is not None
    want_prompt = sampling.prompt_logprobs is not None
    stop_ids = frozenset(sampling.stop_token_ids)
    for p, (ids, mt) in enumerate(zip(prompts, max_tokens, strict=True)):
        if sampling.min_tokens > mt:
            # The client may not know where a max_tokens it never sent came from.
            why = max_tokens_note
            raise bad_request(
                f"min_tokens ({sampling.min_tokens}) must not exceed max_tokens ({mt}){why}",
                "min_tokens",
            )
        base = replace(sampling, n=1, max_tokens=mt)
        for i in range(n):
            proto = base.to_proto()
            if sampling.seed is not None:
                proto.seed = (sampling.seed + i - _INT64_MIN) % _INT64_SPAN + _INT64_MIN
            specs.append(
                SequenceSpec(
                    request_id=f"{request_id}-{p}-{i}",
                    prompt_token_ids=ids,
                    sampling=proto,
                    stop=sampling.stop,
                    stop_token_ids=stop_ids,
                    include_stop_str_in_output=sampling.include_stop_str_in_output,
                    skip_special_tokens=sampling.skip_special_tokens,
                    want_logprobs=want_logprobs,
                    want_prompt_logprobs=want_prompt,
                    priority=priority,
                    grammar=grammar,
                    cache_salt=cache_salt or "",
                )
            )
    return specs
