"""Logits -> tokens, vectorised over the batch, with vLLM's parameter semantics.

Order: logprobs are taken from the raw logits (before any processing, vLLM's default); then
allowed_token_ids, min_tokens and bad-word masking, logit_bias, penalties (repetition: prompt + output tokens, divide positive
logits and multiply negative ones; presence / frequency: output tokens), then the grammar
bitmask of structured-output rows (-inf for disallowed tokens); greedy rows take the
argmax here; the others apply temperature, min_p, top-k, top-p, and sample with the exponential
race (argmax of probs / Exp(1) noise), drawing the noise of a seeded request from its own
generator so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitserve.common.messages import TokenLogprobs
from splitserve.kernels import dispatch


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step sampling inputs, one row per sampling request."""

    temperature: torch.Tensor
    """float32 [N]; 0 means greedy."""
    all_greedy: bool
    """Every row is greedy: skip the random path."""
    all_random: bool
    """No row is greedy: skip the argmax of the processed logits."""
    top_k: torch.Tensor | None = None
    """int64 [N], 0 = off; None when no row uses it."""
    top_p: torch.Tensor | None = None
    """float32 [N], 1 = off; None when no row uses it."""
    min_p: torch.Tensor | None = None
    """float32 [N], 0 = off; None when no row uses it."""
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    """Row -> the request's own generator (seeded requests)."""
    presence_penalty: torch.Tensor | None = None
    """float32 [N]; None (with the other penalties) when no row has a penalty."""
    frequency_penalty: torch.Tensor | None = None
    """float32 [N]."""
    repetition_penalty: torch.Tensor | None = None
    """float32 [N]."""
    prompt_token_ids: torch.Tensor | None = None
    """int64 [N, P] prompt tokens, padded with vocab_size."""
    output_token_ids: torch.Tensor | None = None
    """int64 [N, O] output tokens so far, padded with vocab_size."""
    masked_rows: torch.Tensor | None = None
    """int64 [M] rows of (row, token) pairs set to -inf (min_tokens: EOS and stop ids)."""
    masked_cols: torch.Tensor | None = None
    """int64 [M] tokens of those pairs."""
    allowed_rows: torch.Tensor | None = None
    """int64 [A] rows restricted to allowed_token_ids; None when no row is."""
    allowed_mask: torch.Tensor | None = None
    """bool [A, V]: True where the token may be sampled."""
    bias_rows: torch.Tensor | None = None
    """int64 [K] rows of logit_bias entries."""
    bias_cols: torch.Tensor | None = None
    """int64 [K] tokens of logit_bias entries."""
    bias_values: torch.Tensor | None = None
    """float32 [K] bias values."""
    bitmask: torch.Tensor | None = None
    """int32 [N, ceil(V / 32)] structured-output masks (bit set = token allowed); only the
    rows in bitmask_rows are read. None when no row is constrained."""
    bitmask_rows: torch.Tensor | None = None
    """int64 [G] rows that have a grammar mask this step."""
    bitmask_vocab: int = 0
    """Tokens the grammar masks speak for (the base vocabulary); wider logits (a LoRA
    adapter's added tokens) are -inf past it in those rows. 0: as wide as the logits."""
    logprob_rows: torch.Tensor | None = None
    """int64 [L] rows that asked for logprobs; None when none did."""
    max_num_logprobs: int = 0
    """Largest top-k of logprobs among those rows."""

    @property
    def has_processors(self) -> bool:
        """Whether min_tokens, bad words, allowed_token_ids, logit_bias, penalties or a grammar
        touch the logits this step."""
        return (
            self.masked_rows is not None
            or self.allowed_rows is not None
            or self.bias_rows is not None
            or self.repetition_penalty is not None
            or self.bitmask is not None
        )


@dataclass(slots=True)
class LogprobsTensors:
    """Logprobs of the chosen tokens (and top-k) for some rows of the batch."""

    token_ids: torch.Tensor
    """int64 [L] the chosen token per row."""
    logprobs: torch.Tensor
    """float32 [L] its logprob."""
    ranks: torch.Tensor
    """int64 [L] its 1-based rank."""
    top_ids: torch.Tensor
    """int64 [L, K] top-k token ids, most likely first."""
    top_logprobs: torch.Tensor
    """float32 [L, K] their logprobs."""

    def to_entries(self, counts: list[int]) -> list[TokenLogprobs]:
        """One TokenLogprobs per row, keeping the first counts[i] top entries of row i."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            TokenLogprobs(ids[i], lps[i], ranks[i], top_ids[i][:k], top_lps[i][:k])
            for i, k in enumerate(counts)
        ]


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """Logprobs of token_ids [L] under logits [L, V] (raw), their ranks, and the top num_top."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    # NOTE: rank counts ties as ahead (vLLM's `>=`), so the rank is 1-based and never 0.
    ranks = (logprobs >= chosen).sum(dim=-1)
    if num_top > 0:
        top_lps, top_ids = logprobs.topk(num_top, dim=-1)
    else:
        top_lps = logprobs.new_empty((logits.shape[0], 0))
        top_ids = token_ids.new_empty((logits.shape[0], 0))
    return LogprobsTensors(token_ids, chosen[:, 0], ranks, top_ids, top_lps)


class Sampler:
    """Stateless: every per-request input arrives in a SamplingMetadata."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        """Noise source of requests without a seed."""

    def __call__(
        self, logits: torch.Tensor, meta: SamplingMetadata
    ) -> tuple[torch.Tensor, LogprobsTensors | None]:
        """logits [N, V] raw -> (token ids int64 [N], logprobs of meta.logprob_rows or None)."""
        raw = logits
        if meta.all_greedy and not meta.has_processors:
            sampled = raw.argmax(dim=-1)
            return sampled, self._logprobs(raw, sampled, meta)
        logits = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        self.apply_processors(logits, meta)
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy
        else:
            sampled = self.sample_random(logits, meta)
            if greedy is not None:
                sampled = torch.where(meta.temperature == 0, greedy, sampled)
        return sampled, self._logprobs(raw, sampled, meta)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, sampled: torch.Tensor, meta: SamplingMetadata
    ) -> LogprobsTensors | None:
        if meta.logprob_rows is None:
            return None
        rows = meta.logprob_rows
        return compute_logprobs(
            raw.index_select(0, rows), sampled.index_select(0, rows), meta.max_num_logprobs
        )

    @staticmethod
    def apply_processors(logits: torch.Tensor, meta: SamplingMetadata) -> None:
        """allowed_token_ids, min_tokens and bad-word masking, logit_bias, penalties, then the
        grammar bitmask, in place on float32 logits [N, V]."""
        if meta.allowed_rows is not None:
            rows = logits.index_select(0, meta.allowed_rows)
            rows.masked_fill_(~meta.allowed_mask, float("-inf"))
            logits.index_copy_(0, meta.allowed_rows, rows)
        if meta.masked_rows is not None:
            logits.index_put_(
                (meta.masked_rows, meta.masked_cols),
                torch.tensor(float("-inf"), device=logits.device),
            )
        if meta.bias_rows is not None:
            logits.index_put_((meta.bias_rows, meta.bias_cols), meta.bias_values, accumulate=True)
        if meta.repetition_penalty is not None:
            apply_penalties(logits, meta)
        if meta.bitmask is not None:
            dispatch.apply_token_bitmask(logits, meta.bitmask, meta.bitmask_rows)
            if 0 < meta.bitmask_vocab < logits.shape[1]:
                rows = meta.bitmask_rows
                if rows is None:
                    logits[:, meta.bitmask_vocab :] = float("-inf")
                else:
                    logits[rows, meta.bitmask_vocab :] = float("-inf")

    def sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature, min_p, top-k / top-p, then the exponential race."""
        temperature = torch.where(meta.temperature == 0, 1.0, meta.temperature)
        logits.div_(temperature[:, None])
        if meta.min_p is not None:
            apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        if len(meta.generators) < probs.shape[0]:
            noise.exponential_(generator=self.generator)
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        return probs.div_(noise).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties, in place."""
    n, vocab = logits.shape
    device = logits.device
    prompt_mask = torch.zeros((n, vocab + 1), dtype=torch.bool, device=device)
    prompt_mask.scatter_(1, meta.prompt_token_ids, True)
    counts = torch.zeros((n, vocab + 1), dtype=logits.dtype, device=device)
    counts.scatter_add_(
        1, meta.output_token_ids, torch.ones_like(meta.output_token_ids, dtype=logits.dtype)
    )
    prompt_mask, counts = prompt_mask[:, :vocab], counts[:, :vocab]
    output_mask = counts > 0
    rep = meta.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(prompt_mask | output_mask, penalised, logits))
    logits.sub_(meta.frequency_penalty[:, None] * counts)
    logits.sub_(meta.presence_penalty[:, None] * output_mask)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose probability is below min_p times the top probability, in place."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set with mass >= top_p (per row)."""
    vocab = logits.shape[-1]
    if top_p is None:
        # top-k alone: one topk at the largest k instead of a full sort.
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        max_k = int(k.max())
        values = logits.topk(max_k, dim=-1).values
        kth = values.gather(1, (k.clamp(max=max_k) - 1)[:, None])
        kth = torch.where((top_k > 0)[:, None], kth, float("-inf"))
        return logits.masked_fill_(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (vocab - k)[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    drop = cumulative <= 1 - top_p[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(-1, order, sorted_logits)
