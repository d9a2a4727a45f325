"""splitserve: an OpenAI-compatible LLM server split into gRPC services."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `splitserve.gateway` and `splitserve.scheduler` must import without torch.
    if name == "LLM":
        from splitserve.offline.llm import LLM

        return LLM
    if name == "SamplingParams":
        from splitserve.common.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from splitserve.common.structured_outputs import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(name)
