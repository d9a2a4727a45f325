"""Sampling parameters: the user-facing dataclass (vLLM's names), its engine form and its
protobuf form.

Torch-free: the gateway and the scheduler import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.common.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
"""Default cap on logprobs / top_logprobs / prompt_logprobs (vLLM's --max-logprobs)."""


@dataclass
class SamplingParams:
    """How to sample one request. Defaults follow vLLM."""

    n: int = 1
    """Number of sequences to return for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens below min_p times the top probability; 0 disables."""
    presence_penalty: float = 0.0
    """Additive penalty for tokens present in the output."""
    frequency_penalty: float = 0.0
    """Additive penalty scaled by output counts."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty for tokens in prompt or output; 1 disables."""
    seed: int | None = None
    """Per-request RNG seed."""
    max_tokens: int | None = 16
    """Tokens to generate at most; None means up to the context length."""
    min_tokens: int = 0
    """Tokens to generate before EOS / stop token ids may end the request."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the request."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the text."""
    logprobs: int | None = None
    """Top logprobs to return per generated token."""
    prompt_logprobs: int | None = None
    """Top logprobs to return per prompt token."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Additive logit bias per token id."""
    skip_special_tokens: bool = True
    """Drop special tokens from the text."""
    detokenize: bool = True
    """Produce text (the in-process engine); off returns token ids only."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled; None allows all."""
    bad_words: list[str] = field(default_factory=list)
    """Words never generated: each is banned as written and after a space."""
    bad_words_token_ids: list[list[int]] | None = None
    """The bad_words tokenized (filled by whoever holds the tokenizer: the gateway, LLM)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        errors = validate(self)
        if errors:
            raise ValueError(errors[0][1])

    def to_engine(self):
        """The engine's form (`splitserve.common.messages.SamplingParams`), which the
        in-process engine hands to the scheduler as it is."""
        from splitserve.common import messages

        if self.bad_words and self.bad_words_token_ids is None:
            raise ValueError("bad_words must be tokenized (bad_words_token_ids) before sending")
        return messages.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            logit_bias=dict(self.logit_bias),
            stop=list(self.stop),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            n=self.n,
            allowed_token_ids=list(self.allowed_token_ids or ()),
            bad_words_token_ids=[list(seq) for seq in self.bad_words_token_ids or ()],
        )

    def to_proto(self):
        """The wire form (common.SamplingParams) of `to_engine()`."""
        from splitserve.common.messages_proto import sampling_params_to_proto

        return sampling_params_to_proto(self.to_engine())


def bad_word_variants(word: str) -> tuple[str, str]:
    """The two spellings a bad word is banned in: as written (leading spaces removed) and
    after a space, since most tokenizers spell a word differently mid-sentence."""
    bare = word.lstrip()
    return bare, " " + bare


def validate(
    p: SamplingParams, max_logprobs: int = MAX_LOGPROBS, vocab_size: int | None = None
) -> list[tuple[str, str]]:
    """Return (param, message) for every invalid field; empty when all are valid."""
    e: list[tuple[str, str]] = []
    if not isinstance(p.n, int) or p.n < 1:
        e.append(("n", f"n must be at least 1, got {p.n}"))
    if p.temperature < 0:
        e.append(("temperature", f"temperature must be non-negative, got {p.temperature}"))
    if not 0 < p.top_p <= 1:
        e.append(("top_p", f"top_p must be in (0, 1], got {p.top_p}"))
    if p.top_k < -1:
        e.append(("top_k", f"top_k must be -1 (disable), 0 (disable) or at least 1, got {p.top_k}"))
    if not 0 <= p.min_p <= 1:
        e.append(("min_p", f"min_p must be in [0, 1], got {p.min_p}"))
    if not -2 <= p.presence_penalty <= 2:
        e.append(
            ("presence_penalty", f"presence_penalty must be in [-2, 2], got {p.presence_penalty}")
        )
    if not -2 <= p.frequency_penalty <= 2:
        e.append(
            (
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}",
            )
        )
    if p.repetition_penalty <= 0:
        e.append(
            (
                "repetition_penalty",
                f"repetition_penalty must be greater than 0, got {p.repetition_penalty}",
            )
        )
    if p.max_tokens is not None and (not isinstance(p.max_tokens, int) or p.max_tokens < 1):
        e.append(("max_tokens", f"max_tokens must be at least 1, got {p.max_tokens}"))
    if p.min_tokens < 0:
        e.append(("min_tokens", f"min_tokens must be non-negative, got {p.min_tokens}"))
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        e.append(
            (
                "min_tokens",
                f"min_tokens ({p.min_tokens}) must not exceed max_tokens ({p.max_tokens})",
            )
        )
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if v is not None and (v < 0 or v > max_logprobs):
            e.append((name, f"{name} must be between 0 and {max_logprobs}, got {v}"))
    allowed = getattr(p, "allowed_token_ids", None)
    if allowed is not None and not allowed:
        e.append(("allowed_token_ids", "allowed_token_ids must not be empty when given"))
    if vocab_size is not None:
        for t in allowed or ():
            if not 0 <= t < vocab_size:
                e.append(
                    (
                        "allowed_token_ids",
                        f"allowed_token_ids: token id {t} is outside [0, {vocab_size})",
                    )
                )
                break
        for t in p.stop_token_ids:
            if not 0 <= t < vocab_size:
                e.append(("stop_token_ids", f"stop token id {t} is outside [0, {vocab_size})"))
        for t in p.logit_bias:
            if not 0 <= int(t) < vocab_size:
                e.append(("logit_bias", f"logit_bias token id {t} is outside [0, {vocab_size})"))
    return e
