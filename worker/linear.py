"""Fused projections: one matmul for several checkpoint tensors (q/k/v, gate/up).

Each fused module knows where each checkpoint shard lives along its output dimension, so the
loader copies `q_proj.weight` into the right rows of `qkv_proj.weight` by shard id.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """A Linear whose output rows stack several checkpoint projections, in declaration order."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = offset
            offset += size

    def load_shard(self, param_name: str, shard_id: str, loaded: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`weight` or `bias` of shard `shard_id`) into place."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(
                f"checkpoint has a {param_name} for shard {shard_id!r} but the "
                f"module was built without one"
            )
        start, size = self.shard_offsets[shard_id], self.shard_sizes[shard_id]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard_id!r} {param_name} has shape {tuple(loaded.shape)}, "
                f"expected ({size}, {', '.join(map(str, param.shape[1:]))})"
            )
        with torch.no_grad():
            param.data[start : start + size].copy_(loaded)


class QKVLinear(MergedLinear):
    """q, k and v projections in one: output is [Hq * D | Hk * D | Hk * D]."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
    ) -> None:
        super().__init__(
            hidden_size,
            {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias,
        )


class GateUpLinear(MergedLinear):
    """gate and up projections in one: output is [gate | up]."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias)
