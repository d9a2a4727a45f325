"""`--config FILE.yaml`: flags read from a YAML file, as vLLM's `--config`.

Keys are flag names, with dashes or underscores (`max-model-len: 2048`, `max_model_len`);
values are what the flag takes: a switch is true or false, a list flag takes a list, a JSON
flag takes a mapping. The file's flags go before the command line's, so flags given on the
command line win. A key naming no flag of the command is an error.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _config_path(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _load(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: must hold a mapping of flag names to values, "
            f"got {type(data).__name__}"
        )
    return data


def _tokens(path: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    flag = "--" + key
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} is a switch; give true or false")
        return [flag if value else "--no-" + key]
    if value is None:
        return [flag, "none"]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise ValueError(f"--config {path}: {key} takes one value, got a list")
        return [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    if isinstance(value, bool):
        value = str(value).lower()
    return [flag, str(value)]


def expand_config_file(
    argv: list[str],
    command: str,
    subparser: argparse.ArgumentParser,
    model_given: bool | None,
) -> list[str]:
    """`argv` with the flags of its `--config` file put right after `command` (so the
    command line's own flags, coming later, win). `model_given` says whether the command
    line named the model (None: the command takes no model); a `model` key fills it when
    it did not."""
    path = _config_path(argv)
    if path is None:
        return argv
    data = _load(path)
    actions = subparser._option_string_actions
    prefix: list[str] = []
    tokens: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).strip().lstrip("-").replace("_", "-")
        if key == "config":
            raise ValueError(f"--config {path}: a config file cannot name another one")
        if key == "model" and model_given is not None:
            prefix = [] if model_given else [str(value)]
            continue
        action = actions.get("--" + key)
        if action is None:
            raise ValueError(f"--config {path}: {raw_key!r} is not a flag of `{command}`")
        tokens += _tokens(path, key, value, action)
    at = argv.index(command) + 1
    return argv[:at] + prefix + tokens + argv[at:]
