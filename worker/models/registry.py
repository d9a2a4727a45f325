"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from torch import nn

from splitserve.common.pooling import BASE_MODEL_ARCHITECTURES
from splitserve.worker.models.bamba import BambaForCausalLM
from splitserve.worker.models.gpt_oss import GptOssForCausalLM
from splitserve.worker.models.llama import LlamaForCausalLM, MistralForCausalLM
from splitserve.worker.models.llava import LlavaForConditionalGeneration
from splitserve.worker.models.mamba2 import Mamba2ForCausalLM
from splitserve.worker.models.minimax import MiniMaxForCausalLM
from splitserve.worker.models.minimax_vl import MiniMaxVL01ForConditionalGeneration
from splitserve.worker.models.mixtral import MixtralForCausalLM
from splitserve.worker.models.nemotron_h import NemotronHForCausalLM
from splitserve.worker.models.qwen2 import Qwen2ForCausalLM
from splitserve.worker.models.qwen2_audio import Qwen2AudioForConditionalGeneration
from splitserve.worker.models.qwen3 import Qwen3ForCausalLM
from splitserve.worker.models.qwen3_moe import Qwen3MoeForCausalLM
from splitserve.worker.models.qwen3_next import Qwen3NextForCausalLM
from splitserve.worker.models.whisper import WhisperForConditionalGeneration

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BambaForCausalLM": BambaForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Mamba2ForCausalLM": Mamba2ForCausalLM,
    "MiniMaxForCausalLM": MiniMaxForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "NemotronHForCausalLM": NemotronHForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "MiniMaxVL01ForConditionalGeneration": MiniMaxVL01ForConditionalGeneration,
    "Qwen2AudioForConditionalGeneration": Qwen2AudioForConditionalGeneration,
    "WhisperForConditionalGeneration": WhisperForConditionalGeneration,
}


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The first supported class among `architectures`; ValueError listing the supported ones."""
    for name in architectures or []:
        name = BASE_MODEL_ARCHITECTURES.get(name, name)  # a bare decoder (embedding models)
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported model architecture {architectures!r}; supported: "
        f"{', '.join(sorted(MODEL_REGISTRY))}"
    )
