"""The pooling runner's reduction of hidden states (after the final norm) to one vector per
request, on the last pipeline rank, across chunked-prefill steps.

LAST keeps the hidden state of the prompt's last token (always computed this step: the prefix
cache never serves a prompt's last token). MEAN averages every prompt position and CLS keeps
the first one, so they need every position computed here: the scheduler gives such requests
no prefix-cache hits, and a chunk that starts past what this pooler has seen is an error.
Truncation (matryoshka) and normalization happen in the scheduler (splitserve.common.pooling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.common import messages as msg
from splitserve.common.pooling import (
    PoolerSettings,
    check_runner,
    matryoshka_dimensions,
    resolve_pooler,
)
from splitserve.protos import common_pb2

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Partial:
    total: torch.Tensor
    """float32 sum of the positions seen (MEAN) or the first position's state (CLS)."""
    count: int
    """Positions seen so far."""


class Pooler:
    """Pools one step's hidden states; keeps MEAN/CLS state of requests mid-prefill."""

    def __init__(self, settings: PoolerSettings) -> None:
        self.settings = settings
        self._partial: dict[str, _Partial] = {}

    def remove(self, request_id: str) -> None:
        self._partial.pop(request_id, None)

    def pool(
        self,
        request_ids: list[str],
        hidden: torch.Tensor,
        counts: np.ndarray,
        starts: np.ndarray,
        done: np.ndarray,
        errors: dict[str, str],
    ) -> tuple[list[str], torch.Tensor | None]:
        """Take one step: `hidden` [num_tokens, H] holds each row's chunk, `counts` tokens
        each, starting at prompt position `starts`; `done` marks rows whose prompt ends here.
        Returns the finished request ids and their pooled vectors [n, H] (float32)."""
        ends = np.cumsum(counts)
        kind = self.settings.pooling_type
        if kind == "LAST":
            rows = np.flatnonzero(done)
            if rows.size == 0:
                return [], None
            index = torch.from_numpy(ends[rows] - 1).to(hidden.device)
            return [request_ids[i] for i in rows.tolist()], hidden.index_select(0, index).float()
        finished: list[str] = []
        vectors: list[torch.Tensor] = []
        for i, rid in enumerate(request_ids):
            chunk = hidden[ends[i] - counts[i] : ends[i]]
            part = self._partial.get(rid)
            seen = 0 if part is None else part.count
            if int(starts[i]) != seen:
                # NOTE: positions [seen, start) were never pooled here (a prefix-cache hit).
                errors[rid] = (
                    f"{kind} pooling needs every prompt position computed, but this chunk starts "
                    f"at {int(starts[i])} after {seen} pooled positions"
                )
                self.remove(rid)
                continue
            if kind == "MEAN":
                total = chunk.float().sum(0)
                part = _Partial(total if part is None else part.total + total, seen)
            elif part is None:  # CLS: the first position of the first chunk
                part = _Partial(chunk[0].float(), 0)
            part.count = seen + int(counts[i])
            if done[i]:
                self._partial.pop(rid, None)
                finished.append(rid)
                vectors.append(part.total / part.count if kind == "MEAN" else part.total)
            else:
                self._partial[rid] = part
        return finished, (torch.stack(vectors) if vectors else None)

    def step_result(
        self,
        step_id: int,
        request_ids: list[str],
        hidden: torch.Tensor,
        counts: np.ndarray,
        starts: np.ndarray,
        done: np.ndarray,
        errors: dict[str, str],
    ) -> msg.StepResult:
        """One step of the pooling runner as its StepResult: the pooled vector of every
        request whose prompt ended this step (nothing is sampled, no token is appended)."""
        finished, vectors = self.pool(request_ids, hidden, counts, starts, done, errors)
        result = msg.StepResult(step_id=step_id, errors=errors)
        if vectors is not None:
            for rid, row in zip(finished, vectors.cpu().numpy(), strict=True):
                if rid not in errors:
                    result.pooled.append(msg.PooledOutput(rid, row.tolist()))
        return result


def setup_runner(config, loaded, is_last: bool) -> tuple[str, Pooler | None, common_pb2.RunnerInfo]:
    """--runner for one rank: the runner, the Pooler (pooling runner, last rank only) and the
    RunnerInfo the worker reports in Describe."""
    hf_config = loaded.hf_config
    runner = check_runner(config, getattr(hf_config, "architectures", None))
    if runner != "pooling":
        return runner, None, common_pb2.RunnerInfo(runner=runner)
    settings = resolve_pooler(loaded.path, config.pooler_config, config.override_pooler_config)
    matryoshka, dims = matryoshka_dimensions(hf_config)
    info = common_pb2.RunnerInfo(
        runner=runner,
        pooling_type=settings.pooling_type,
        normalize=settings.normalize,
        hidden_size=int(hf_config.hidden_size),
        is_matryoshka=matryoshka,
        matryoshka_dimensions=dims,
    )
    logger.info(
        "pooling runner: %s pooling, normalize=%s", settings.pooling_type, settings.normalize
    )
    return runner, Pooler(settings) if is_last else None, info
