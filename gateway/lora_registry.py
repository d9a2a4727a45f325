"""The LoRA adapters the gateway offers: --lora-modules at start, plus runtime loads.

An adapter is a model name clients may ask for; requests naming it carry its (resolved) folder
to the scheduler. Paths are checked here (a 400, or a start-up error for --lora-modules) and
again by the workers before they read anything.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    path: Path
    int_id: int
    """This load's number (vLLM's lora_int_id), fresh for every load: the workers keep
    weights and the scheduler keeps prefix-cache blocks per load, so a reload reads the
    files again instead of serving the weights of an earlier load of the same name."""
    base_model_name: str | None = None


def runtime_updates_allowed() -> bool:
    """vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    return os.environ.get(RUNTIME_UPDATE_ENV, "").lower() in ("1", "true")


class LoRARegistry:
    """Adapter name -> folder. Construction checks every --lora-modules adapter (ValueError)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.enable_lora
        self.max_lora_rank = config.max_lora_rank
        modules = parse_lora_modules(config.lora_modules)
        self.roots = allowed_roots(config.lora_root, modules)
        self.adapters: dict[str, Adapter] = {}
        self._load_numbers = itertools.count(1)
        for m in modules:
            if m.name in config.model_names():
                raise ValueError(f"--lora-modules name {m.name!r} is the base model's name")
            try:
                # NOTE: a relative --lora-modules path is relative to the working directory.
                path = os.path.abspath(m.path)
                self.adapters[m.name] = self._check(m.name, path, m.base_model_name)
            except ValueError as exc:
                raise ValueError(f"--lora-modules {m.name}={m.path}: {exc}") from None

    def _check(self, name: str, path: str, base_model_name: str | None) -> Adapter:
        folder = resolve_adapter_path(path, self.roots)
        read_adapter_config(folder, self.max_lora_rank)
        return Adapter(name, folder, next(self._load_numbers), base_model_name)

    def get(self, name: str | None) -> Adapter | None:
        return self.adapters.get(name) if name else None

    def load(self, name: str, path: str, base_names: list[str]) -> None:
        """Add an adapter at runtime; RequestError 400 for a bad name, path or config."""
        if not self.enabled:
            raise RequestError(400, "LoRA is not enabled: start with --enable-lora", "lora_name")
        if not name or not path:
            raise RequestError(400, "both lora_name and lora_path are required", "lora_name")
        if name in self.adapters or name in base_names:
            raise RequestError(400, f"the model name {name!r} is already in use", "lora_name")
        try:
            self.adapters[name] = self._check(name, path, None)
        except LoRAPathError as exc:
            raise RequestError(400, str(exc), "lora_path") from None
        except ValueError as exc:
            raise RequestError(400, str(exc), "lora_path") from None

    def unload(self, name: str) -> None:
        """Drop a runtime or start-up adapter; RequestError 404 when there is none by that name."""
        if self.adapters.pop(name, None) is None:
            raise RequestError(
                404,
                f"The LoRA adapter `{name}` does not exist.",
                "lora_name",
                code="model_not_found",
            )
