"""Layer modules of the decoder: RMSNorm (with fused residual add), SiLU-and-mul, rotary.

Each forward calls `splitserve.kernels.dispatch`, which runs the Triton kernel on CUDA tensors
and the torch path (`splitserve.kernels.torch_ops`) elsewhere; no device test lives here. The
rotary cos/sin table comes from `splitserve.kernels.rotary`, the one RoPE implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitserve.kernels import dispatch
from splitserve.kernels.rotary import build_cos_sin_cache, rope_parameters_of, rotary_dim_of


class RMSNorm(nn.Module):
    """RMSNorm; called with a residual it adds first and returns (normed, new residual).

    NOTE: with a residual, x is consumed (the CPU path writes the sum into it); pass a tensor
    the layer owns, such as a projection's fresh output.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return dispatch.rms_norm(x, self.weight, self.eps)
        return dispatch.fused_add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """The gated activation of Llama-style MLPs over a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.silu_and_mul(x)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over a [max_positions, rotary_dim] cos/sin table (fp32).

    Args:
        head_dim: per-head dim.
        max_positions: rows of the table (the context length served).
        params: HF rope settings, as `rope_parameters_of(config)` returns them.
        max_position_embeddings: the config's, for yarn configs without a factor.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        params: dict[str, Any],
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim_of(params, head_dim)
        self.max_positions = max_positions
        self.params = dict(params)
        self.max_position_embeddings = max_position_embeddings
        self.init_cache()

    def init_cache(self) -> None:
        """(Re)build the table on CPU, then move it to the buffer's current device.

        Under the loader's meta-device construction only a placeholder is registered; the
        loader calls this again after materializing (`post_materialize`).
        """
        if torch.empty(0).device.type == "meta":
            placeholder = torch.empty(self.max_positions, self.rotary_dim, dtype=torch.float32)
            self.register_buffer("cos_sin_cache", placeholder, persistent=False)
            return
        device = torch.device("cpu")
        if "cos_sin_cache" in self._buffers and self.cos_sin_cache.device.type != "meta":
            device = self.cos_sin_cache.device
        with torch.device("cpu"):
            table = build_cos_sin_cache(
                self.params,
                self.head_dim,
                self.max_positions,
                self.rotary_dim,
                max_position_embeddings=self.max_position_embeddings,
            )
        self.register_buffer("cos_sin_cache", table.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hk, D] IN PLACE by positions int64 [T]."""
        return dispatch.apply_rotary(positions, q, k, self.cos_sin_cache, is_neox=True)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one flat dict (see `kernels.rotary.rope_parameters_of`)."""
    return rope_parameters_of(config)
