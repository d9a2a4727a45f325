"""Pipeline split: which layers a rank owns, and what crosses between stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def layer_range(
    num_layers: int, rank: int, world_size: int, partition: list[int] | None = None
) -> tuple[int, int]:
    """Return [start, end) of the decoder layers rank `rank` of `world_size` owns.

    `partition` gives each rank's layer count (it must sum to `num_layers`). Without one,
    layers split evenly; the remainder goes to the ranks just before the last one, which
    also carries the final norm and lm_head (vLLM's split, so checkpoints shard alike).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if partition is not None:
        if len(partition) != world_size or sum(partition) != num_layers:
            raise ValueError(
                f"pp_layer_partition {','.join(map(str, partition))} gives "
                f"{len(partition)} ranks {sum(partition)} layers, but the model has "
                f"{num_layers} layers over {world_size} pipeline ranks"
            )
        sizes = list(partition)
    else:
        if num_layers < world_size:
            raise ValueError(f"cannot split {num_layers} layers over {world_size} pipeline ranks")
        sizes = [num_layers // world_size] * world_size
        for i in range(2, num_layers % world_size + 2):
            sizes[-i] += 1
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(slots=True)
class IntermediateTensors:
    """Activations a non-last rank hands to the next: both [num_tokens, hidden_size]."""

    hidden_states: torch.Tensor
    residual: torch.Tensor
    layout: int | None = None
    """The sender's `step_layout` of these tokens, when they crossed between processes."""


def run_stage(
    model: torch.nn.Module,
    norm: torch.nn.Module | None,
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    intermediate: IntermediateTensors | None,
) -> torch.Tensor | IntermediateTensors:
    """A decoder stack's forward over its pipeline slice: embed (first rank) or take the
    previous rank's tensors, run `model.layers[start_layer:end_layer]` (each
    `(positions, hidden_states, residual) -> (hidden_states, residual)`), then the final `norm`
    (last rank) or hand the tensors on."""
    if model.embed_tokens is not None:
        hidden_states, residual = model.embed_tokens(input_ids), None
    else:
        if intermediate is None:
            raise ValueError("a non-first pipeline rank needs the previous rank's tensors")
        # The first norm consumes hidden_states: keep the sender's tensor intact.
        hidden_states = intermediate.hidden_states.clone()
        residual = intermediate.residual
    layers = model.layers
    for i in range(model.start_layer, model.end_layer):
        hidden_states, residual = layers[i](positions, hidden_states, residual)
    if norm is None:
        return IntermediateTensors(hidden_states, residual)
    hidden_states, _ = norm(hidden_states, residual)
    return hidden_states


def step_layout(rows: np.ndarray, ends: np.ndarray) -> int:
    """A fingerprint of which batch rows a step computes, in which order, and each one's
    computed length after it: pipeline ranks must agree, or activations land on wrong rows."""
    n = rows.size
    if n == 0:
        return 0
    weights = np.arange(1, n + 1, dtype=np.int64)
    # int64 wrap-around is fine: both ranks compute the same wrapped value.
    with np.errstate(over="ignore"):
        mixed = (rows.astype(np.int64) * 1_000_003 + ends.astype(np.int64)) * weights
        return int(mixed.sum() & 0x7FFF_FFFF_FFFF_FFFF)
