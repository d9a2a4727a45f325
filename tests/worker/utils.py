"""Helpers of the worker tests."""

from __future__ import annotations

import torch

from splitserve.worker.attention import AttentionMetadata, TorchAttentionBackend, forward_context


@torch.inference_mode()
def model_forward(model, token_ids: list[int], intermediate=None):
    """One cache-free prefill of `token_ids` through a model slice: logits [T, V] on the last
    rank, IntermediateTensors otherwise."""
    n = len(token_ids)
    meta = AttentionMetadata(
        n,
        None,
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n,
        max_seq_len=n,
    )
    with forward_context(TorchAttentionBackend(), meta):
        out = model(torch.tensor(token_ids), torch.arange(n), intermediate)
    return model.compute_logits(out) if model.lm_head is not None else out


@torch.inference_mode()
def hf_logits(path, token_ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model(torch.tensor([token_ids])).logits[0]


class SharedGrid:
    """Worker processes (GridWorkers, PipelineWorkers: `procs` and `kill()`) started on first
    use and shared by several tests of a module, each connecting its own engine (Describe and
    InitializeCache again, as a restarted scheduler would). A test that breaks them (kills or
    stops a rank) `take`s them; the next user then starts fresh ones, as it does when a rank
    has exited."""

    def __init__(self, start) -> None:
        self._start = start
        self._grid = None

    def get(self):
        if self._grid is not None and any(p.poll() is not None for p in self._grid.procs):
            self._grid.kill()
            self._grid = None
        if self._grid is None:
            self._grid = self._start()
        return self._grid

    def take(self):
        """The grid, no longer shared: the caller kills it."""
        grid = self.get()
        self._grid = None
        return grid

    def close(self) -> None:
        if self._grid is not None:
            self._grid.kill()
            self._grid = None
