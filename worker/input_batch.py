"""Per-request state that persists across steps, kept as rows of preallocated numpy arrays.

Each live request owns one row: its token ids (prompt + outputs), block table, counters and
sampling parameters. A step gathers what it needs with fancy indexing over the rows it
schedules, so building the step's tensors costs a few numpy calls, not a Python loop per token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from splitserve.common import messages as msg
from splitserve.worker.sampler import SamplingMetadata

_SAMPLING_EPS = 1e-5
"""Temperatures below this sample greedily (vLLM's threshold)."""


class InputBatch:
    """Rows of request state; `rows[request_id]` is the row of a live request."""

    def __init__(
        self,
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        num_blocks: int,
        device: torch.device,
        initial_rows: int = 64,
        max_logprobs: int = 20,
        num_state_slots: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.num_state_slots = num_state_slots
        """Recurrent-state slots (models with state-space layers); 0: none."""
        self.max_logprobs = max_logprobs
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.num_cache_blocks = num_blocks
        self.device = device
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.rows: dict[str, int] = {}
        self.req_ids: list[str | None] = []
        self.free_rows: list[int] = []
        self.generators: list[torch.Generator | None] = []
        self.logit_bias: list[dict[int, float] | None] = []
        self.allowed: list[torch.Tensor | None] = []
        self.bad_words: list[list[tuple[int, ...]] | None] = []
        self.stop_ids: list[list[int]] = []
        self.num_seeded = 0
        self.num_biased = 0
        self.num_allowed = 0
        self.num_bad_words = 0
        self._alloc(initial_rows)

    def _alloc(self, n: int) -> None:
        # NOTE: np.zeros maps untouched pages lazily, so max_model_len-wide rows cost only
        # what requests actually fill.
        self.token_ids = np.zeros((n, self.max_model_len + 1), np.int32)
        self.block_table = np.zeros((n, self.max_blocks_per_seq), np.int32)
        self.num_tokens = np.zeros(n, np.int32)
        self.num_prompt = np.zeros(n, np.int32)
        self.num_computed = np.zeros(n, np.int32)
        self.num_blocks = np.zeros(n, np.int32)
        self.state_slot = np.zeros(n, np.int64)
        self.temperature = np.zeros(n, np.float32)
        self.top_p = np.ones(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.min_p = np.zeros(n, np.float32)
        self.presence = np.zeros(n, np.float32)
        self.frequency = np.zeros(n, np.float32)
        self.repetition = np.ones(n, np.float32)
        self.min_tokens = np.zeros(n, np.int32)
        self.logprobs = np.full(n, -1, np.int32)
        self.prompt_logprobs = np.full(n, -1, np.int32)
        self.ignore_eos = np.zeros(n, bool)
        self.req_ids += [None] * n
        self.generators += [None] * n
        self.logit_bias += [None] * n
        self.allowed += [None] * n
        self.bad_words += [None] * n
        self.stop_ids += [[] for _ in range(n)]
        self.free_rows = list(range(n - 1, -1, -1))

    def _grow(self) -> None:
        old = len(self.req_ids)
        arrays = {
            name: getattr(self, name)
            for name, value in vars(self).items()
            if isinstance(value, np.ndarray)
        }
        for name, array in arrays.items():
            grown = np.zeros((old * 2, *array.shape[1:]), array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self.top_p[old:] = 1
        self.repetition[old:] = 1
        self.logprobs[old:] = -1
        self.prompt_logprobs[old:] = -1
        self.req_ids += [None] * old
        self.generators += [None] * old
        self.logit_bias += [None] * old
        self.allowed += [None] * old
        self.bad_words += [None] * old
        self.stop_ids += [[] for _ in range(old)]
        self.free_rows = list(range(2 * old - 1, old - 1, -1))

    def add(self, req: msg.NewRequest, vocab_limit: int | None = None) -> str | None:
        """Create the request's row; return an error message instead when it is invalid.
        `vocab_limit` bounds its token ids (default vocab_size; a LoRA adapter's added tokens
        give its requests more, the rest of the batch less: see worker/lora_vocab.py)."""
        error = self._validate(req, self.vocab_size if vocab_limit is None else vocab_limit)
        if error:
            return error
        if req.request_id in self.rows:
            self.remove(req.request_id)  # resumed after preemption without a finish notice
        if not self.free_rows:
            self._grow()
        row = self.free_rows.pop()
        self.rows[req.request_id] = row
        self.req_ids[row] = req.request_id
        n = len(req.token_ids)
        self.token_ids[row, :n] = req.token_ids
        self.num_tokens[row] = n
        self.num_prompt[row] = req.num_prompt_tokens if req.num_prompt_tokens > 0 else n
        self.num_computed[row] = req.num_computed_tokens
        self.num_blocks[row] = 0
        self.state_slot[row] = req.state_slot
        self.append_blocks(row, req.block_ids)
        self._set_sampling(row, req.sampling_params)
        return None

    def _validate(self, req: msg.NewRequest, limit: int) -> str | None:
        n = len(req.token_ids)
        if n == 0:
            return "request has no token ids"
        if n > self.max_model_len:
            return f"request has {n} tokens, more than max_model_len ({self.max_model_len})"
        ids = np.asarray(req.token_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= limit)]
        if bad.size:
            return f"token id {int(bad[0])} is outside the vocabulary [0, {limit})"
        if not 0 <= req.num_computed_tokens < n:
            return f"num_computed_tokens {req.num_computed_tokens} is outside [0, {n})"
        if not 0 <= req.num_prompt_tokens <= n:
            return f"num_prompt_tokens {req.num_prompt_tokens} is outside [0, {n}]"
        if self.num_state_slots:
            if not 0 <= req.state_slot < self.num_state_slots:
                return f"state_slot {req.state_slot} is outside [0, {self.num_state_slots})"
            if req.num_computed_tokens and not 0 <= req.restore_state_slot < self.num_state_slots:
                # NOTE: a recurrent state exists only where it was computed or snapshotted.
                return (
                    "a model with recurrent layers starts from cached tokens only with a state "
                    f"snapshot (restore_state_slot {req.restore_state_slot})"
                )
        return self._check_sampling(req.sampling_params, limit) or self._check_blocks(
            req.block_ids, 0
        )

    def _check_sampling(self, sp, limit: int) -> str | None:
        """What would make this request's row NaN or crash the batch (the gateway checks the
        rest); everything else was validated upstream."""
        bad_words = [t for seq in sp.bad_words_token_ids for t in seq]
        for t in [*sp.stop_token_ids, *sp.logit_bias, *sp.allowed_token_ids, *bad_words]:
            if not 0 <= t < limit:
                return f"token id {t} in sampling parameters is outside [0, {limit})"
        if any(not seq for seq in sp.bad_words_token_ids):
            return "bad_words_token_ids holds an empty sequence"
        if sp.temperature is not None and not sp.temperature >= 0:
            return f"temperature must be non-negative, got {sp.temperature}"
        if sp.top_p is not None and not 0 < sp.top_p <= 1:
            return f"top_p must be in (0, 1], got {sp.top_p}"
        if sp.repetition_penalty is not None and not sp.repetition_penalty > 0:
            return f"repetition_penalty must be greater than 0, got {sp.repetition_penalty}"
        if sp.min_p is not None and not 0 <= sp.min_p <= 1:
            return f"min_p must be in [0, 1], got {sp.min_p}"
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(sp, name)
            if value is not None and not 0 <= value <= self.max_logprobs:
                return f"{name} must be between 0 and {self.max_logprobs}, got {value}"
        return None

    def _check_blocks(self, block_ids, have: int) -> str | None:
        if not block_ids:
            return None
        ids = np.asarray(block_ids)
        if ids.min() < 0 or ids.max() >= self.num_cache_blocks:
            return f"block ids must be in [0, {self.num_cache_blocks}), got {block_ids}"
        if have + len(ids) > self.max_blocks_per_seq:
            return f"block table would exceed {self.max_blocks_per_seq} blocks"
        return None

    def _set_sampling(self, row: int, sp: msg.SamplingParams) -> None:
        # Unset (None) fields take the values common.proto names.
        temperature = 1.0 if sp.temperature is None else sp.temperature
        self.temperature[row] = temperature if temperature >= _SAMPLING_EPS else 0.0
        self.top_p[row] = 1.0 if sp.top_p is None else sp.top_p
        self.top_k[row] = max(sp.top_k or 0, 0)
        self.min_p[row] = sp.min_p or 0.0
        self.presence[row] = sp.presence_penalty or 0.0
        self.frequency[row] = sp.frequency_penalty or 0.0
        self.repetition[row] = 1.0 if sp.repetition_penalty is None else sp.repetition_penalty
        self.min_tokens[row] = sp.min_tokens or 0
        self.logprobs[row] = -1 if sp.logprobs is None else sp.logprobs
        self.prompt_logprobs[row] = -1 if sp.prompt_logprobs is None else sp.prompt_logprobs
        self.ignore_eos[row] = bool(sp.ignore_eos)
        self.logit_bias[row] = dict(sp.logit_bias) or None
        self.num_biased += self.logit_bias[row] is not None
        if sp.allowed_token_ids:
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            allowed[torch.tensor(list(sp.allowed_token_ids), dtype=torch.int64)] = True
            self.allowed[row] = allowed
            self.num_allowed += 1
        else:
            self.allowed[row] = None
        words = [tuple(seq) for seq in sp.bad_words_token_ids]
        self.bad_words[row] = words or None
        self.num_bad_words += bool(words)
        self.stop_ids[row] = list(sp.stop_token_ids)
        if sp.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sp.seed)
            self.generators[row] = gen
            self.num_seeded += 1
        else:
            self.generators[row] = None

    def append_blocks(self, row: int, block_ids) -> str | None:
        """Append to the row's block table; an error message when the ids are invalid."""
        if not block_ids:
            return None
        have = int(self.num_blocks[row])
        error = self._check_blocks(block_ids, have)
        if error:
            return error
        self.block_table[row, have : have + len(block_ids)] = block_ids
        self.num_blocks[row] = have + len(block_ids)
        return None

    def remove(self, req_id: str) -> None:
        """Forget a request (unknown ids are ignored)."""
        row = self.rows.pop(req_id, None)
        if row is None:
            return
        self.req_ids[row] = None
        self.num_seeded -= self.generators[row] is not None
        self.num_biased -= self.logit_bias[row] is not None
        self.num_allowed -= self.allowed[row] is not None
        self.num_bad_words -= self.bad_words[row] is not None
        self.generators[row] = None
        self.logit_bias[row] = None
        self.allowed[row] = None
        self.bad_words[row] = None
        self.stop_ids[row] = []
        self.free_rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def sampling_metadata(self, rows: np.ndarray, eos_token_ids: list[int]) -> SamplingMetadata:
        """Gather the sampling inputs of `rows` (one per sampling request, in batch order)."""
        device = self.device
        temperature = self.temperature[rows]
        greedy = temperature == 0
        meta = SamplingMetadata(
            torch.from_numpy(temperature).to(device),
            all_greedy=bool(greedy.all()),
            all_random=not greedy.any(),
        )
        if not meta.all_greedy:
            self._random_params(meta, rows)
        self._penalties(meta, rows)
        self._masks(meta, rows, eos_token_ids)
        num_logprobs = self.logprobs[rows]
        wanted = np.flatnonzero(num_logprobs >= 0)
        if wanted.size:
            meta.logprob_rows = torch.from_numpy(wanted).to(device)
            meta.max_num_logprobs = int(num_logprobs[wanted].max())
        return meta

    def _random_params(self, meta: SamplingMetadata, rows: np.ndarray) -> None:
        device = self.device
        top_k, top_p, min_p = self.top_k[rows], self.top_p[rows], self.min_p[rows]
        if (top_k > 0).any():
            meta.top_k = torch.from_numpy(top_k.astype(np.int64)).to(device)
        if (top_p < 1).any():
            meta.top_p = torch.from_numpy(top_p).to(device)
        if (min_p > 0).any():
            meta.min_p = torch.from_numpy(min_p).to(device)
        if self.num_seeded:
            gens = self.generators
            meta.generators = {
                i: gens[r] for i, r in enumerate(rows.tolist()) if gens[r] is not None
            }

    def _penalties(self, meta: SamplingMetadata, rows: np.ndarray) -> None:
        presence, frequency = self.presence[rows], self.frequency[rows]
        repetition = self.repetition[rows]
        if not ((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any()):
            return
        device = self.device
        num_tokens, num_prompt = self.num_tokens[rows], self.num_prompt[rows]
        width = int(num_tokens.max())
        tokens = self.token_ids[rows, :width].astype(np.int64)
        cols = np.arange(width)[None, :]
        pad = self.vocab_size
        prompt = np.where(cols < num_prompt[:, None], tokens, pad)
        output = np.where((cols >= num_prompt[:, None]) & (cols < num_tokens[:, None]), tokens, pad)
        meta.presence_penalty = torch.from_numpy(presence).to(device)
        meta.frequency_penalty = torch.from_numpy(frequency).to(device)
        meta.repetition_penalty = torch.from_numpy(repetition).to(device)
        meta.prompt_token_ids = torch.from_numpy(prompt).to(device)
        meta.output_token_ids = torch.from_numpy(output).to(device)

    def _masks(self, meta: SamplingMetadata, rows: np.ndarray, eos_token_ids: list[int]) -> None:
        device = self.device
        num_output = self.num_tokens[rows] - self.num_prompt[rows]
        pending = np.flatnonzero(num_output < self.min_tokens[rows])
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i in pending.tolist():
            row = int(rows[i])
            ids = self.stop_ids[row] + ([] if self.ignore_eos[row] else eos_token_ids)
            mask_rows += [i] * len(ids)
            mask_cols += ids
        if self.num_bad_words:
            self._bad_word_bans(rows, mask_rows, mask_cols)
        if mask_rows:
            meta.masked_rows = torch.tensor(mask_rows, dtype=torch.int64, device=device)
            meta.masked_cols = torch.tensor(mask_cols, dtype=torch.int64, device=device)
        if self.num_allowed:
            pairs = [
                (i, self.allowed[r])
                for i, r in enumerate(rows.tolist())
                if self.allowed[r] is not None
            ]
            if pairs:
                meta.allowed_rows = torch.tensor(
                    [i for i, _ in pairs], dtype=torch.int64, device=device
                )
                meta.allowed_mask = torch.stack([m for _, m in pairs])
        if self.num_biased:
            b_rows: list[int] = []
            b_cols: list[int] = []
            b_vals: list[float] = []
            for i, row in enumerate(rows.tolist()):
                bias = self.logit_bias[row]
                if bias:
                    b_rows += [i] * len(bias)
                    b_cols += bias.keys()
                    b_vals += bias.values()
            if b_rows:
                meta.bias_rows = torch.tensor(b_rows, dtype=torch.int64, device=device)
                meta.bias_cols = torch.tensor(b_cols, dtype=torch.int64, device=device)
                meta.bias_values = torch.tensor(b_vals, dtype=torch.float32, device=device)

    def _bad_word_bans(self, rows: np.ndarray, mask_rows: list[int], mask_cols: list[int]) -> None:
        """(row, token) pairs the bad words ban this step: a one-token word always, a longer
        one's last token when the output so far ends with the rest of it."""
        for i, row in enumerate(rows.tolist()):
            words = self.bad_words[row]
            if not words:
                continue
            start, end = int(self.num_prompt[row]), int(self.num_tokens[row])
            for seq in words:
                k = len(seq) - 1
                if k > end - start:
                    continue
                if k == 0 or tuple(self.token_ids[row, end - k : end].tolist()) == seq[:-1]:
                    mask_rows.append(i)
                    mask_cols.append(seq[-1])
