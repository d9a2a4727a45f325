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
