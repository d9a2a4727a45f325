"""Where the workers keep each LoRA adapter, decided by the scheduler: the CPU-memory LRU
(--max-cpu-loras) and the device slot table (--max-loras).

The workers only hold tensors. A step message tells them what to drop (`lora_evictions`,
applied before the step's new requests are added) and which adapters go into which device
slot (`lora_slots`, applied before the forward); a worker reads an adapter from disk when a
new request names one it does not hold. Every pipeline rank applies the same message, so all
ranks hold the same adapters.

Why this is enough to stay within the limits: admission keeps the adapters of running
requests within max_loras (`Scheduler._lora_fits`), max_cpu_loras >= max_loras, and only
adapters no running request uses are evicted; so an adapter a step needs is always in CPU
memory and in a slot, and there is always an unused one to evict when room is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

AdapterKey = tuple[str, int]
"""(adapter name, load number): one load of an adapter."""


@dataclass(slots=True)
class LoRAPlacement:
    """One step's instructions to the workers."""

    evictions: list[AdapterKey] = field(default_factory=list)
    """Drop these from CPU memory and their device slots (before new requests are added)."""
    slots: list[tuple[AdapterKey, int]] = field(default_factory=list)
    """Copy each adapter into its device slot, replacing what the slot held."""


class LoRAResidency:
    """The scheduler's copy of what every worker holds."""

    def __init__(self, max_loras: int, max_cpu_loras: int | None) -> None:
        self.max_cpu = max_cpu_loras or max_loras
        self.cpu: OrderedDict[AdapterKey, None] = OrderedDict()
        """Adapters in the workers' CPU memory, least recently used first."""
        self.slots: list[AdapterKey | None] = [None] * max_loras
        """The device slot table: slot index -> adapter."""
        self._slot_use = [0] * max_loras
        self._clock = 0
        self._dropping: set[AdapterKey] = set()
        """Unloaded adapters still used by running requests: dropped once they finish."""
        self.num_evictions = 0
        """Adapters dropped from CPU memory so far."""

    def place(
        self, step: set[AdapterKey], running: set[AdapterKey], unloaded: list[AdapterKey]
    ) -> LoRAPlacement:
        """Plan a step that uses the adapters `step`, while running requests use `running`
        (a superset). Adapters `unloaded` from the adapter table since the last call are
        dropped as soon as no running request uses them (not left to the LRU)."""
        out = LoRAPlacement()
        self._dropping.update(unloaded)
        for key in [k for k in self._dropping if k not in running]:
            self._dropping.discard(key)
            if key in self.cpu:
                self._evict(key, out)
        for key in sorted(step):
            if key in self.cpu:
                self.cpu.move_to_end(key)
            else:
                self.cpu[key] = None  # a new request brings it; the worker reads it
        while len(self.cpu) > self.max_cpu:
            victim = next((k for k in self.cpu if k not in running), None)
            if victim is None:  # cannot happen while admission keeps its bound (docstring)
                raise RuntimeError(
                    f"{len(self.cpu)} LoRA adapters in use exceed max_cpu_loras {self.max_cpu}"
                )
            self._evict(victim, out)
        self._clock += 1
        for key in sorted(step):
            if key in self.slots:
                self._slot_use[self.slots.index(key)] = self._clock
                continue
            free = [i for i, k in enumerate(self.slots) if k is None or k not in step]
            if not free:
                raise RuntimeError(
                    f"a step uses {len(step)} LoRA adapters but max_loras is {len(self.slots)}"
                )
            slot = min(free, key=lambda i: (self.slots[i] is not None, self._slot_use[i]))
            self.slots[slot] = key
            self._slot_use[slot] = self._clock
            out.slots.append((key, slot))
        return out

    def _evict(self, key: AdapterKey, out: LoRAPlacement) -> None:
        del self.cpu[key]
        if key in self.slots:
            self.slots[self.slots.index(key)] = None
        out.evictions.append(key)
        self.num_evictions += 1
