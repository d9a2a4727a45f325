"""Recurrent-state tensors of this rank: per state-space layer, a conv state and an SSM state
for each of the scheduler's state slots, bound to the layer (`layer.state_cache`).

Shapes per layer: conv [num_slots, *conv_state_shape], ssm [num_slots, *ssm_state_shape]. A
request's slot arrives with it (NewRequest.state_slot) and the step's slots travel in the
forward context (`AttentionMetadata.state_slots`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from splitserve.worker.cache_spec import RecurrentStateSpec, cache_layers


def recurrent_layers(model: nn.Module) -> list[nn.Module]:
    """This rank's layers whose cache is a recurrent state, in layer order."""
    return [
        m
        for m in cache_layers(model)
        if isinstance(m.cache_spec(1, torch.float32), RecurrentStateSpec)
    ]


def new_state_cache(
    model: nn.Module, num_slots: int, dtype: torch.dtype, device: torch.device
) -> StateCache | None:
    """The model's state cache; None without recurrent layers. ValueError when it has some
    and the scheduler gave no slots."""
    if not recurrent_layers(model):
        return None
    if num_slots < 1:
        raise ValueError("this model has recurrent-state layers: num_state_slots must be positive")
    return StateCache(model, num_slots, dtype, device)


class StateCache:
    """Conv and SSM state tensors for every recurrent layer of this rank."""

    def __init__(
        self, model: nn.Module, num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.layers = recurrent_layers(model)
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            spec: RecurrentStateSpec = layer.cache_spec(1, dtype)
            # NOTE: the layer's spec may keep its state wider than the model (fp32 sums).
            conv = torch.zeros((num_slots, *spec.conv_state_shape), dtype=spec.dtype, device=device)
            ssm = torch.zeros((num_slots, *spec.ssm_state_shape), dtype=spec.dtype, device=device)
            self.caches.append((conv, ssm))
        self.bind()

    def bind(self) -> None:
        for layer, cache in zip(self.layers, self.caches, strict=True):
            layer.state_cache = cache

    def unbind(self) -> None:
        for layer in self.layers:
            layer.state_cache = None

    def copy(self, src: int, dst: int) -> None:
        """Copy slot `src`'s state of every layer into slot `dst` (snapshots, restores)."""
        if src == dst:
            return
        for conv, ssm in self.caches:
            conv[dst].copy_(conv[src])
            ssm[dst].copy_(ssm[src])

    def take_snapshots(
        self, snapshots: list[tuple[str, int]], rows: dict[str, int], slots: np.ndarray
    ) -> None:
        """Copy each named request's state (`slots[rows[request id]]`, computed to a block
        boundary by the step just run) into its snapshot slot."""
        for rid, slot in snapshots:
            row = rows.get(rid)
            if row is not None and 0 <= slot < self.num_slots:
                self.copy(int(slots[row]), slot)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes + s.nbytes for c, s in self.caches)
