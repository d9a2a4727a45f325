"""LoRA adapters without torch: the flags, path safety, and peft's adapter_config.json.

Shared by the gateway (start-up checks, /v1/models, dynamic loading), the scheduler (slot
limits) and the workers (which re-check every path before reading a byte of it).

Path rule: an adapter folder must resolve (symlinks followed) inside one of the allowed roots:
`--lora-root` when given, else the folders named by `--lora-modules`. `../x`, absolute paths
elsewhere and symlinks that leave the root are refused before anything is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""peft target module names splitserve applies an adapter to."""
MOE_TARGETS = ("w1", "w2", "w3", "gate", "experts", "block_sparse_moe", "gate_up_proj")
"""peft target names of MoE experts and routers (Mixtral's w1/w2/w3, the router `gate`)."""
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
RUNTIME_UPDATE_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
VOCAB_MODULES = ("embed_tokens", "lm_head")
"""Modules an adapter may resize to add tokens (modules_to_save, trainable_token_indices)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""An adapter folder holding one of these has its own tokenizer (with the tokens it adds)."""
NEW_EMBEDDINGS_NAME = "new_embeddings.safetensors"
"""The older extra-vocabulary layout: input_embeddings / output_embeddings of the added tokens."""


MAX_EXTRA_VOCAB = 1 << 16
"""Largest --lora-extra-vocab-size: every step's logits are that many columns wider."""


class LoRAPathError(ValueError):
    """An adapter path outside the allowed root (or not an adapter folder): a 400."""


@dataclass(frozen=True, slots=True)
class LoRAModule:
    """One adapter the server offers: the name clients use, and its folder."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter for `LLM.generate` (vLLM's LoRARequest: name, int id, path)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What splitserve uses of a peft adapter_config.json, checked."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    """Of VOCAB_MODULES: saved whole (resized), for the rows they add past the base vocabulary."""
    trainable_token_indices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(module, token ids) pairs of peft's TrainableTokens, a list form applying to embed_tokens."""

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (as peft)."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


def parse_lora_modules(items: list[str] | None) -> list[LoRAModule]:
    """`name=path` items, or vLLM's JSON form `{"name": .., "path": .., "base_model_name": ..}`."""
    modules: list[LoRAModule] = []
    for item in items or []:
        text = str(item).strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"lora_modules item {text!r} is not valid JSON: {exc}") from exc
            if not isinstance(obj, dict) or not obj.get("name") or not obj.get("path"):
                raise ValueError(f"lora_modules JSON item {text!r} needs 'name' and 'path'")
            extra = set(obj) - {"name", "path", "base_model_name"}
            if extra:
                raise ValueError(f"lora_modules JSON item has unknown keys {sorted(extra)}")
            modules.append(
                LoRAModule(str(obj["name"]), str(obj["path"]), obj.get("base_model_name"))
            )
            continue
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules item {text!r} must be name=path or a JSON object")
        modules.append(LoRAModule(name, path))
    names = [m.name for m in modules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"lora_modules names must be unique, repeated: {dupes}")
    return modules


def allowed_roots(lora_root: str | None, modules: list[LoRAModule]) -> list[Path]:
    """The folders adapters may live in: `lora_root`, else each --lora-modules folder."""
    if lora_root:
        return [Path(lora_root).resolve()]
    return [Path(m.path).resolve() for m in modules]


def resolve_adapter_path(path: str, roots: list[Path]) -> Path:
    """The adapter folder `path` resolved (symlinks followed) inside one of `roots`.

    A relative path is taken relative to the first root. Raises LoRAPathError, without opening
    anything, when the result lies outside every root.
    """
    if not roots:
        raise LoRAPathError(
            "no LoRA root is allowed: start with --lora-root DIR (or --lora-modules) first"
        )
    if "\x00" in path or not path:
        raise LoRAPathError(f"invalid LoRA path {path!r}")
    raw = Path(path)
    candidate = raw if raw.is_absolute() else roots[0] / raw
    resolved = Path(os.path.realpath(candidate))
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise LoRAPathError(
            f"LoRA path {path!r} resolves outside the allowed root(s) {', '.join(map(str, roots))}"
        )
    if not resolved.is_dir() or not (resolved / CONFIG_NAME).is_file():
        raise LoRAPathError(f"LoRA path {path!r} is not a folder with {CONFIG_NAME}")
    return resolved


def adapter_weight_file(folder: Path) -> Path:
    """adapter_model.safetensors, else adapter_model.bin, inside `folder` (already resolved).

    The file itself must also resolve inside the folder (no symlink out of it).
    """
    for name in WEIGHT_NAMES:
        f = folder / name
        if f.exists():
            real = Path(os.path.realpath(f))
            if not real.is_relative_to(folder):
                raise LoRAPathError(f"{f} is a link that leaves the adapter folder")
            return real
    raise LoRAPathError(f"adapter folder {folder} has none of {', '.join(WEIGHT_NAMES)}")


def read_adapter_config(folder: Path, max_lora_rank: int) -> AdapterConfig:
    """peft's adapter_config.json of `folder`, refusing what splitserve does not apply."""
    cfg_file = folder / CONFIG_NAME
    real = Path(os.path.realpath(cfg_file))
    if not real.is_relative_to(folder):
        raise LoRAPathError(f"{cfg_file} is a link that leaves the adapter folder")
    try:
        cfg = json.loads(real.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {cfg_file}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a JSON object")
    where = f"adapter {folder.name!r}"
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise ValueError(f"{where}: DoRA (use_dora) adapters are not supported")
    to_save = cfg.get("modules_to_save") or []
    if isinstance(to_save, str) or set(to_save) - set(VOCAB_MODULES):
        raise ValueError(
            f"{where}: modules_to_save {to_save!r} is not supported (only "
            f"{' and '.join(VOCAB_MODULES)}, for tokens the adapter adds)"
        )
    trainable = _trainable_token_indices(cfg.get("trainable_token_indices"), where)
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias {cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{where}: per-module {key} is not supported")
    if cfg.get("layers_to_transform") is not None:
        raise ValueError(f"{where}: layers_to_transform is not supported")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{where}: fan_in_fan_out adapters are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{where}: target_modules must be a list of module names, got {targets!r}")
    unsupported = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unsupported:
        moe = sorted(set(unsupported) & set(MOE_TARGETS))
        hint = f"; {moe} are MoE expert or router modules, which LoRA does not cover" if moe else ""
        raise ValueError(
            f"{where}: target modules {unsupported} are not supported "
            f"(supported: {', '.join(SUPPORTED_TARGETS)}){hint}"
        )
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise ValueError(f"{where}: rank {rank} exceeds --max-lora-rank {max_lora_rank}")
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, int | float):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return AdapterConfig(
        rank,
        float(alpha),
        bool(cfg.get("use_rslora")),
        tuple(sorted(targets)),
        tuple(sorted(to_save)),
        trainable,
    )


def _trainable_token_indices(value, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """peft's trainable_token_indices: a list (embed_tokens) or {module: list}, checked."""
    if not value:
        return ()
    items = value.items() if isinstance(value, dict) else [("embed_tokens", value)]
    out: list[tuple[str, tuple[int, ...]]] = []
    for module, ids in items:
        if module not in VOCAB_MODULES:
            raise ValueError(
                f"{where}: trainable_token_indices of {module!r} are not supported "
                f"(only {' and '.join(VOCAB_MODULES)})"
            )
        if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"{where}: trainable_token_indices must list token ids, got {ids!r}")
        out.append((module, tuple(ids)))
    return tuple(out)


def check_lora_fields(config) -> None:
    """The LoRA flags a service config carries (whichever of them it has), checked."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    extra = get("lora_extra_vocab_size", 0)
    if extra is not None and not 0 <= extra <= MAX_EXTRA_VOCAB:
        raise ValueError(f"lora_extra_vocab_size must be in [0, {MAX_EXTRA_VOCAB}], got {extra}")
    if extra and not get("enable_lora", False):
        raise ValueError(f"--lora-extra-vocab-size {extra} needs --enable-lora")
    for name in ("max_loras", "max_lora_rank"):
        value = get(name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    cpu, slots = get("max_cpu_loras"), get("max_loras")
    if cpu is not None and slots is not None and cpu < slots:
        raise ValueError(f"max_cpu_loras ({cpu}) must be >= max_loras ({slots})")
    modules = parse_lora_modules(get("lora_modules"))
    if (modules or get("lora_root")) and not get("enable_lora", False):
        raise ValueError("--lora-modules and --lora-root need --enable-lora")
