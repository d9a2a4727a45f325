"""What one step runs on a rank, as the model runner builds it: the scheduled rows and the
tensors made for them (`StepPlan`), and the grammar bitmasks of its constrained rows being
filled beside the forward pass (`GrammarMasks`)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.worker.attention import AttentionMetadata


@dataclass(slots=True)
class GrammarMasks:
    """The grammar bitmasks of one step's constrained sampling rows, being filled."""

    request_ids: list[str]
    """Request id of every sampling row that samples, in sampling order."""
    positions: list[int]
    """Sampling rows (indices into request_ids) that carry a mask."""
    future: Future | None
    """-> (int32 bitmask [len(request_ids), words], failed request id -> message); None when
    no row carries a mask."""
    deferred: list[int]
    """Indices into the step's sampling rows that do not sample: their grammar is still
    compiling. They are reported in `deferred_request_ids` and their last position is
    computed again in a later step."""


@dataclass(slots=True)
class StepPlan:
    """The scheduled requests of one step, decode-first, and the tensors built for them."""

    rows: np.ndarray
    """Batch rows, decodes first."""
    ends: np.ndarray
    """Computed tokens per row after this step."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: np.ndarray
    """Rows that sample a token this step."""
    logits_indices: torch.Tensor
    """Token indices whose logits are needed: sampling positions, then prompt-logprob ones."""
    prompt_logprobs: list[tuple[str, int, int, int]]
    """(request id, first logits index, count, top-k) of each prompt-logprobs chunk."""
    prompt_targets: torch.Tensor | None
    """The next prompt token of every prompt-logprobs position, in that order."""
    counts: np.ndarray | None = None
    """Tokens computed per row this step (LoRA groups tokens by their row's adapter)."""

    def logits_request_ids(self, req_ids: list[str | None]) -> list[str | None]:
        """The request of each logits row (`req_ids` by batch row): the sampling rows, then
        the prompt-logprob chunks."""
        out = [req_ids[r] for r in self.sample_rows.tolist()]
        for rid, _, count, _ in self.prompt_logprobs:
            out += [rid] * count
        return out
