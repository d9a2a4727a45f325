"""The gateway's side of LoRA adapters: path checks, and a view of the scheduler's table.

The scheduler owns adapter identity (`scheduler/lora_adapters.py`): names, folders and load
numbers, shared by every gateway in front of it. This gateway
- checks every folder before it asks the scheduler to load it (a 400 naming the problem, or a
  start-up error for --lora-modules), as the workers check it again before reading it;
- makes sure its own --lora-modules are loaded when it starts (a name the scheduler already
  holds from another folder is a start-up error naming both);
- forwards /v1/load_lora_adapter and /v1/unload_lora_adapter, and reads /v1/models' adapters
  from the scheduler;
- keeps the scheduler's table as a cache to route requests by model name without a call per
  request. The cache is only a hint: a request sends the adapter's name alone and the
  scheduler resolves it, so an adapter another gateway unloaded is a 404 here too (NOT_FOUND
  from the scheduler), and a name this gateway has not seen yet is looked up before a 404.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitserve.common.lora import (
    RUNTIME_UPDATE_ENV,
    LoRAPathError,
    allowed_roots,
    parse_lora_modules,
    read_adapter_config,
    resolve_adapter_path,
)
from splitserve.gateway.config import GatewayConfig
from splitserve.gateway.errors import RequestError
from splitserve.protos import scheduler_pb2


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: Path
    int_id: int
    """The scheduler's load number (vLLM's lora_int_id)."""
    base_model_name: str | None = None

    @classmethod
    def from_proto(cls, a: scheduler_pb2.LoRAAdapter) -> Adapter:
        return cls(a.lora_name, Path(a.lora_path), a.lora_int_id, a.base_model_name or None)


def runtime_updates_allowed() -> bool:
    """vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    return os.environ.get(RUNTIME_UPDATE_ENV, "").lower() in ("1", "true")


def adapter_not_found(name: str) -> RequestError:
    return RequestError(
        404, f"The LoRA adapter `{name}` does not exist.", "lora_name", code="model_not_found"
    )


class LoRARegistry:
    """Construction checks every --lora-modules folder (ValueError); `start` loads them into
    the scheduler; then `adapters` mirrors the scheduler's table."""

    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.enable_lora
        self.max_lora_rank = config.max_lora_rank
        self._base_names = config.model_names()
        modules = parse_lora_modules(config.lora_modules)
        self.roots = allowed_roots(config.lora_root, modules)
        self.startup: list[tuple[str, Path, str | None]] = []
        """(name, checked folder, base model name) of each --lora-modules adapter."""
        self.adapters: dict[str, Adapter] = {}
        """The scheduler's adapters by name, as last seen."""
        self._scheduler = None
        for m in modules:
            if m.name in self._base_names:
                raise ValueError(f"--lora-modules name {m.name!r} is the base model's name")
            try:
                # NOTE: a relative --lora-modules path is relative to the working directory.
                folder = self._check(os.path.abspath(m.path))
            except ValueError as exc:
                raise ValueError(f"--lora-modules {m.name}={m.path}: {exc}") from None
            self.startup.append((m.name, folder, m.base_model_name))

    def _check(self, path: str) -> Path:
        folder = resolve_adapter_path(path, self.roots)
        read_adapter_config(folder, self.max_lora_rank)
        return folder

    async def start(self, scheduler) -> None:
        """Load this gateway's --lora-modules into the scheduler (`scheduler`: its stub) unless
        it holds them already, then read its table. ValueError when a name is loaded there
        from another folder."""
        self._scheduler = scheduler
        for name, folder, base in self.startup:
            loaded = await scheduler.LoadLoRAAdapter(
                scheduler_pb2.LoadLoRAAdapterRequest(
                    lora_name=name,
                    lora_path=str(folder),
                    base_model_name=base or "",
                    if_absent=True,
                )
            )
            if os.path.realpath(loaded.lora_path) != str(folder):
                raise ValueError(
                    f"--lora-modules {name}={folder}: the scheduler already serves {name!r} "
                    f"from {loaded.lora_path}"
                )
        await self.refresh()

    async def refresh(self) -> None:
        """Replace the cached table with the scheduler's."""
        resp = await self._scheduler.ListLoRAAdapters(scheduler_pb2.ListLoRAAdaptersRequest())
        self.adapters = {a.lora_name: Adapter.from_proto(a) for a in resp.adapters}

    def get(self, name: str | None) -> Adapter | None:
        """The cached adapter named `name` (no call)."""
        return self.adapters.get(name) if name else None

    async def lookup(self, name: str | None) -> Adapter | None:
        """The adapter named `name`, asking the scheduler when the cache does not know it."""
        if not name or not self.enabled or name in self._base_names:
            return None
        adapter = self.adapters.get(name)
        if adapter is None and self._scheduler is not None:
            await self.refresh()
            adapter = self.adapters.get(name)
        return adapter

    def forget(self, name: str) -> None:
        """The scheduler no longer has `name` (a request naming it was refused)."""
        self.adapters.pop(name, None)

    async def load(self, name: str, path: str, base_names: list[str]) -> None:
        """Check the folder, then load it in the scheduler; RequestError 400 for a bad name,
        path or config, or a name already loaded."""
        if not self.enabled:
            raise RequestError(400, "LoRA is not enabled: start with --enable-lora", "lora_name")
        if not name or not path:
            raise RequestError(400, "both lora_name and lora_path are required", "lora_name")
        if name in base_names:
            raise RequestError(400, f"the model name {name!r} is already in use", "lora_name")
        try:
            folder = self._check(path)
        except (LoRAPathError, ValueError) as exc:
            raise RequestError(400, str(exc), "lora_path") from None
        try:
            loaded = await self._scheduler.LoadLoRAAdapter(
                scheduler_pb2.LoadLoRAAdapterRequest(lora_name=name, lora_path=str(folder))
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                raise RequestError(
                    400, f"the model name {name!r} is already in use", "lora_name"
                ) from None
            raise
        self.adapters[name] = Adapter.from_proto(loaded)

    async def unload(self, name: str) -> None:
        """Unload an adapter in the scheduler; RequestError 404 when it has none by that name."""
        if not self.enabled:
            raise adapter_not_found(name)
        try:
            await self._scheduler.UnloadLoRAAdapter(
                scheduler_pb2.UnloadLoRAAdapterRequest(lora_name=name)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self.forget(name)
                raise adapter_not_found(name) from None
            raise
        self.forget(name)
