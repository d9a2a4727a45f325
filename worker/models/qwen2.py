"""Qwen2: Llama layers with a bias on q/k/v (none on o_proj or the MLP), embeddings usually tied."""

from __future__ import annotations

from typing import Any

from splitserve.worker.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 for one pipeline slice; sliding-window layers come from `layer_types`."""

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool, bool]:
        return True, False, False
