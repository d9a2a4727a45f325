"""The LoRA adapters a scheduler serves: one table of names, folders and load numbers.

The scheduler, not a gateway, owns adapter identity: every front end (several gateways,
direct gRPC clients, the in-process engine) loads, unloads and lists through it, so they all
see the same adapters and the same load numbers (vLLM's lora_int_id). A load number keys the
workers' weights and the prefix cache: an adapter unloaded and loaded again gets a new one, so
its (possibly rewritten) files are read afresh while requests still running on the old load
keep the old weights.

The table never opens the adapter's files (in a compose deployment the scheduler need not
see them): the gateway checks a folder before it asks for a load, and every worker checks it
again against its own allowed roots before reading a byte.

Thread safety: loads and unloads arrive on the gRPC event loop while the engine thread
resolves requests, so every method takes the table's lock.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass

from splitserve.common.lora import parse_lora_modules


class AdapterError(Exception):
    """A load or unload the table refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: str
    int_id: int
    """This load's number: fresh for every load, never reused while the scheduler runs."""
    base_model_name: str = ""


class AdapterTable:
    """Adapter name -> Adapter, with load numbers handed out here."""

    def __init__(self, lora_modules: list[str] | None = None) -> None:
        self._by_name: dict[str, Adapter] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._unloaded: list[tuple[str, int]] = []
        for m in parse_lora_modules(lora_modules):
            # NOTE: a relative --lora-modules path is relative to the working directory, as
            # the gateway and the workers read it.
            self.load(m.name, os.path.abspath(m.path), m.base_model_name or "")

    def load(
        self, name: str, path: str, base_model_name: str = "", if_absent: bool = False
    ) -> Adapter:
        """Add an adapter under a fresh load number. A name already loaded is ALREADY_EXISTS,
        unless `if_absent` (a front end's start-up adapters): then the loaded one is returned
        as it is, whatever its folder (the caller compares)."""
        if not name or not path:
            raise AdapterError("INVALID_ARGUMENT", "both lora_name and lora_path are required")
        with self._lock:
            loaded = self._by_name.get(name)
            if loaded is not None:
                if if_absent:
                    return loaded
                raise AdapterError(
                    "ALREADY_EXISTS",
                    f"The lora adapter '{name}' has already been loaded (from {loaded.path}).",
                )
            adapter = Adapter(name, path, next(self._numbers), base_model_name)
            self._by_name[name] = adapter
            return adapter

    def unload(self, name: str) -> Adapter:
        """Remove an adapter (requests already running on it finish on its weights)."""
        with self._lock:
            adapter = self._by_name.pop(name, None)
            if adapter is not None:
                self._unloaded.append((adapter.name, adapter.int_id))
        if adapter is None:
            raise AdapterError("NOT_FOUND", f"The lora adapter '{name}' cannot be found.")
        return adapter

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.get(name)

    def list(self) -> list[Adapter]:
        """Every adapter, in load order."""
        with self._lock:
            return sorted(self._by_name.values(), key=lambda a: a.int_id)

    def take_unloaded(self) -> list[tuple[str, int]]:
        """(name, load number) of the adapters unloaded since the last call."""
        with self._lock:
            out, self._unloaded = self._unloaded, []
        return out
