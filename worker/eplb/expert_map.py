"""The logical -> physical expert map of EPLB, and the router's spread over replicas.

Physical slot p of a layer holds logical expert phy2log[p]; a logical expert with several
replicas has its (token, slot) pairs dealt round-robin over them, by pair index plus a per-layer
running offset kept on the device (so one-token decode steps rotate over the replicas too),
and each replica gets an even share without any host sync. The tensors have fixed shapes for the
lifetime of the map (log2phy's replica axis is sized for the most replicas any expert can
get, num_physical - num_experts + 1), and a new placement is copied into them in place, so a
captured CUDA graph that reads them stays valid.
"""

from __future__ import annotations

import torch


class ExpertMap:
    """phy2log int64 [L, P]; log2phy int64 [L, E, P - E + 1] (-1 past an expert's replicas);
    logcnt int64 [L, E] (replicas per logical expert). All on one device."""

    def __init__(self, phy2log: torch.Tensor, num_experts: int) -> None:
        num_layers, num_physical = phy2log.shape
        if num_physical < num_experts:
            raise ValueError(f"{num_physical} physical slots cannot hold {num_experts} experts")
        self.num_layers, self.num_physical, self.num_experts = num_layers, num_physical, num_experts
        device = phy2log.device
        self.phy2log = torch.empty(num_layers, num_physical, dtype=torch.int64, device=device)
        self.log2phy = torch.empty(
            num_layers,
            num_experts,
            num_physical - num_experts + 1,
            dtype=torch.int64,
            device=device,
        )
        self.logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64, device=device)
        self.offset = torch.zeros(num_layers, dtype=torch.int64, device=device)
        """Pairs routed so far per layer: where the next call's round-robin starts."""
        self.update(phy2log)

    @classmethod
    def initial(cls, num_layers: int, num_experts: int, num_physical: int, device=None):
        """Expert e in slot e, then one replica each of experts 0, 1, ... in the spare slots
        (the placement before any load is known)."""
        slots = torch.arange(num_physical, device=device) % num_experts
        return cls(slots.expand(num_layers, num_physical).contiguous(), num_experts)

    def update(self, phy2log: torch.Tensor) -> None:
        """Adopt a new placement [L, P] (in place: the tensors keep their addresses)."""
        if tuple(phy2log.shape) != (self.num_layers, self.num_physical):
            raise ValueError(
                f"placement must be [{self.num_layers}, {self.num_physical}], got "
                f"{tuple(phy2log.shape)}"
            )
        rows = phy2log.cpu().tolist()
        width = self.log2phy.shape[-1]
        log2phy = torch.full((self.num_layers, self.num_experts, width), -1, dtype=torch.int64)
        logcnt = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        for layer, row in enumerate(rows):
            for slot, expert in enumerate(row):
                if not 0 <= expert < self.num_experts:
                    raise ValueError(f"layer {layer} slot {slot}: no logical expert {expert}")
                log2phy[layer, expert, logcnt[layer, expert]] = slot
                logcnt[layer, expert] += 1
        missing = (logcnt == 0).nonzero().tolist()
        if missing:
            raise ValueError(f"(layer, expert) pairs without a slot: {missing[:8]}")
        self.phy2log.copy_(phy2log)
        self.log2phy.copy_(log2phy)
        self.logcnt.copy_(logcnt)

    def to(self, device: torch.device | str) -> ExpertMap:
        return ExpertMap(self.phy2log.to(device), self.num_experts)

    def to_physical(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, K] -> physical slots [T, K] of layer `layer`: pair i of a
        logical expert e goes to its replica (offset + i) mod replicas[e] (an even, sync-free
        spread); the layer's offset then advances by T * K."""
        ids = topk_ids.to(torch.int64)
        counts = self.logcnt[layer][ids]
        pair = torch.arange(ids.numel(), device=ids.device).view(ids.shape) + self.offset[layer]
        self.offset[layer] += ids.numel()
        return self.log2phy[layer][ids, pair % counts]

    def placement(self, layer: int) -> list[int]:
        """The logical expert of each slot of `layer` (host copy)."""
        return self.phy2log[layer].tolist()
