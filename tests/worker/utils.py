"""Helpers of the worker tests."""

from __future__ import annotations

import torch

from splitserve.worker.attention import (
    AttentionMetadata,
    PrefillSeq,
    TorchAttentionBackend,
    forward_context,
)


@torch.inference_mode()
def model_forward(model, token_ids: list[int], intermediate=None):
    """One cache-free prefill of `token_ids` through a model slice: logits [T, V] on the last
    rank, IntermediateTensors otherwise."""
    n = len(token_ids)
    meta = AttentionMetadata(n, None, 0, prefills=[PrefillSeq(0, n, n, None)])
    with forward_context(TorchAttentionBackend(), meta):
        out = model(torch.tensor(token_ids), torch.arange(n), intermediate)
    return model.compute_logits(out) if model.lm_head is not None else out


@torch.inference_mode()
def hf_logits(path, token_ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model(torch.tensor([token_ids])).logits[0]
