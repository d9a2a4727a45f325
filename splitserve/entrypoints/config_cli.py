"""Command-line flags generated from the services' config dataclasses.

Every field of a config dataclass becomes `--field-name`, its help the field's docstring,
so `--help` and the config never drift. A field that several services share (say
`max_model_len`) is one flag that sets it in each of them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
from typing import Any


def service_configs() -> tuple[type, type, type, type]:
    """The config dataclasses of the gateway, scheduler, worker and tokenizer service (imported
    here, lazily, so that the launcher and the CLI share them without importing each other)."""
    from splitserve.gateway.config import GatewayConfig
    from splitserve.scheduler.config import SchedulerConfig
    from splitserve.tokenizer_svc.config import TokenizerServiceConfig
    from splitserve.worker.config import WorkerConfig

    return GatewayConfig, SchedulerConfig, WorkerConfig, TokenizerServiceConfig


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (the string literal right after it). A base
    made by `engine_fields` has no source of its own: its fields' docstrings are read where
    they are declared (`DOCS_DECLARED_IN`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = klass.__dict__.get("DOCS_DECLARED_IN", klass)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _kind(annotation: Any) -> tuple[str, bool]:
    """('bool'|'int'|'float'|'str'|'list', optional) from a field's annotation string."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = str(text).replace(" ", "")
    optional = "None" in text.split("|")
    base = [p for p in text.split("|") if p != "None"]
    base_t = base[0] if base else "str"
    if base_t.startswith(("list", "tuple")):
        return "list", optional
    if base_t in ("bool", "int", "float"):
        return base_t, optional
    return "str", optional


def _parse_int(text: str) -> int:
    """An int, allowing sizes like 4GiB / 512MiB / 2G and underscores."""
    t = text.strip().replace("_", "")
    units = {
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "tib": 1 << 40,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
    }
    low = t.lower()
    for suffix in sorted(units, key=len, reverse=True):
        if low.endswith(suffix) and low[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(low[: -len(suffix)]) * units[suffix])
    return int(t)


VLLM_SPELLINGS = {
    "pipeline_parallel_size": ("-pp",),
    "tensor_parallel_size": ("-tp",),
    "enable_expert_parallel": ("-ep",),
    "drain_timeout_s": ("--shutdown-timeout",),
}
"""vLLM's other spellings of flags that config fields generate."""


def add_config_flags(
    parser: argparse.ArgumentParser,
    *classes: type,
    skip: set[str] = frozenset(),
    default_text: dict[str, str] | None = None,
) -> None:
    """Add one flag per field across `classes` (first class's help wins on shared names).

    `default_text` replaces the default `--help` shows for a field, where the command
    decides the value itself (`serve` picks free ports for the services' addresses)."""
    seen: set[str] = set()
    group = parser.add_argument_group("engine and service options")
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in skip or not f.init:
                continue
            seen.add(f.name)
            kind, optional = _kind(f.type)
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = repr(f.default_factory())  # type: ignore[misc]
            else:
                default = repr(None)
            default = (default_text or {}).get(f.name, default)
            flag = "--" + f.name.replace("_", "-")
            help_text = docs.get(f.name, "")
            help_text = f"{help_text} (default: {default})" if help_text else None
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": argparse.SUPPRESS,
                "help": help_text,
            }
            flags = (flag, *VLLM_SPELLINGS.get(f.name, ()))
            if kind == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            elif kind == "list":
                group.add_argument(*flags, nargs="+", **kwargs)
            else:
                conv = {"int": _parse_int, "float": float, "str": str}[kind]
                if optional:
                    conv = _optional(conv)
                group.add_argument(*flags, type=conv, **kwargs)


def _optional(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else conv(text)

    parse.__name__ = conv.__name__
    return parse


def _json_list(value: Any) -> Any:
    """A list flag given as one JSON list, as vLLM takes `--allowed-origins '["a", "b"]'`."""
    if isinstance(value, list) and len(value) == 1 and str(value[0]).lstrip().startswith("["):
        try:
            parsed = json.loads(value[0])
        except ValueError:
            return value
        if isinstance(parsed, list):
            return [v if isinstance(v, str) else json.dumps(v) for v in parsed]
    return value


def build_config(cls: type, args: argparse.Namespace, **overrides: Any):
    """Instantiate `cls` from the parsed flags it has (unset flags keep the defaults)."""
    values = vars(args)
    kwargs = {
        f.name: _json_list(values[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.name in values
    }
    kwargs.update(
        {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(cls)}}
    )
    config = cls(**kwargs)
    engine = getattr(cls, "ENGINE_FIELDS", ())
    if engine:
        # Engine fields given on the command line are fixed even at their default value:
        # a peer service must then agree with them rather than lend its own.
        config.explicit_engine_fields = frozenset(n for n in engine if n in kwargs)
    return config


def config_to_argv(config: Any, skip: set[str] = frozenset()) -> list[str]:
    """Flags that rebuild `config` in a child process (only fields off their default, and
    engine fields given explicitly)."""
    argv: list[str] = []
    explicit = getattr(config, "explicit_engine_fields", frozenset())
    for f in dataclasses.fields(config):
        if f.name in skip or not f.init:
            continue
        value = getattr(config, f.name)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory()
                if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                else dataclasses.MISSING
            )
        )
        if value == default and f.name not in explicit:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, _ = _kind(f.type)
        if kind == "bool":
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif kind == "list":
            argv += [flag, *map(str, value)]
        elif value is None:
            argv += [flag, "none"]
        else:
            argv += [flag, str(value)]
    return argv
