"""Load this rank's slice of a Hugging Face checkpoint: config, EOS ids, weights by name.

Weights come from *.safetensors (one file, several, or sharded through
model.safetensors.index.json), from *.bin / *.pt (`load_format="pt"`, or "auto" without
safetensors; read with torch.load(weights_only=True)), or are random (`dummy`, which opens no
weight file). Only tensors this rank owns are read, shard by shard (see weight_files.py).

`check_model` runs the same checks on a meta-device model from the checkpoint's headers, so the
launcher can refuse a bad model before any process starts or port opens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splitserve.common.generation_config import SamplingDefaults, resolve
from splitserve.common.hf_overrides import apply_hf_overrides
from splitserve.common.model_path import (
    ALLOW_PATTERNS,
    CONFIG_PATTERNS,
    PT_PATTERNS,
    hub_offline,
    is_local_folder,
    resolve_model_path,
)
from splitserve.common.pooling import is_base_model
from splitserve.worker import parallel_state
from splitserve.worker.checkpoint_slices import read_shard_lazily, whole
from splitserve.worker.config import WorkerConfig
from splitserve.worker.kv_cache_scales import configure_kv_cache, load_kv_scale, log_kv_cache
from splitserve.worker.linear import (
    MergedLinear,
    default_weight_loader,
    process_weights_after_loading,
    restore_weight_attrs,
)
from splitserve.worker.models.registry import get_model_class
from splitserve.worker.moe import MoEExperts
from splitserve.worker.pipeline import layer_range
from splitserve.worker.quantization import apply_quant_config, resolve_quant_config
from splitserve.worker.weight_files import iterate_weights, read_shard_shapes

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float": torch.float32,
    "half": torch.float16,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")
_BASE_MODEL_PREFIX = (re.compile(r"^(?!model\.|lm_head\.)"), "model.")
_EXPERT_RE = re.compile(
    r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<param>\w+)$"
)


_ELSEWHERE = ("", "")
"""`_param_target` of a tensor this rank does not hold by design (another rank's expert)."""


@dataclass
class LoadedModel:
    """A model slice on its device, with the facts the runner needs about it."""

    model: nn.Module
    hf_config: Any
    path: pathlib.Path
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]
    start_layer: int
    end_layer: int
    max_model_len: int
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    """Defaults for unset request fields (--generation-config, --override-generation-config)."""

    @property
    def text_config(self) -> Any:
        """The language model's config (the whole config for a text-only model; the
        `text_config` of a multimodal one)."""
        return self.hf_config.get_text_config()

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding (may exceed the tokenizer's vocabulary)."""
        return int(self.text_config.vocab_size)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, raw_config: dict, device: torch.device) -> torch.dtype:
    """ "auto" -> the checkpoint's dtype on CUDA (fp32 checkpoints stay fp32), float32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    saved = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(saved).removeprefix("torch."), torch.float32)


def read_eos_token_ids(path: pathlib.Path, hf_config: Any) -> list[int]:
    """Union of config.json's and generation_config.json's eos_token_id (int or list)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(hf_config, "eos_token_id", None))
    if hf_config.get_text_config() is not hf_config:
        add(getattr(hf_config.get_text_config(), "eos_token_id", None))
    gen = path / "generation_config.json"
    if gen.exists():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    return ids


def sampling_defaults(config: WorkerConfig, path: pathlib.Path) -> SamplingDefaults:
    """The default sampling parameters of `config` for the model folder `path`; ValueError
    names the file and field when generation_config.json holds a bad value."""
    return resolve(config.generation_config, path, config.override_generation_config)


def _resolve_folder(config: WorkerConfig) -> pathlib.Path:
    """The local folder of `config.model`, with the files its load format needs (for a hub
    id: downloaded or found in the cache at `config.revision`)."""
    patterns = {
        "dummy": CONFIG_PATTERNS,
        "pt": CONFIG_PATTERNS + PT_PATTERNS,
    }.get(config.load_format, ALLOW_PATTERNS)

    def resolve(allow: list[str]) -> pathlib.Path:
        return resolve_model_path(
            config.model,
            config.revision,
            allow_patterns=allow,
            cache_dir=config.download_dir,
            hub_flags={"--code-revision": config.code_revision},
            ignore_patterns=config.weight_ignore_patterns(),
        )

    path = resolve(patterns)
    if (
        config.load_format == "auto"
        and not is_local_folder(config.model)
        and not list(path.glob("*.safetensors"))
    ):
        path = resolve(CONFIG_PATTERNS + PT_PATTERNS)  # no safetensors on the hub: take .bin
    return path


def load_hf_config(path: pathlib.Path, config: WorkerConfig | None = None) -> tuple[dict, Any]:
    """(raw config.json dict, transformers config) after checking we can run the model.

    A config that transformers can only build with Python code from the model folder (a
    model_type it does not know) is refused unless `trust_remote_code`; even then only the
    architectures splitserve implements run. As in transformers, a trusted folder's own config
    class (auto_map's AutoConfig) is used when it ships one.
    """
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    trust = bool(config and config.trust_remote_code)
    remote = _remote_code_reason(raw)
    if remote and not trust:
        raise ValueError(
            f"the model at {path} needs remote code ({remote}); splitserve does not run code "
            "from a model folder unless --trust-remote-code is given"
        )
    try:
        get_model_class(raw.get("architectures"))
    except ValueError as exc:
        if remote:
            raise ValueError(
                f"{exc}. splitserve runs only its own model implementations, even with "
                "--trust-remote-code"
            ) from None
        raise
    from transformers import AutoConfig

    if not (trust and "AutoConfig" in (raw.get("auto_map") or {})):
        return raw, AutoConfig.from_pretrained(path)
    if config is not None and not is_local_folder(config.model):
        # Let transformers fetch the config code at --code-revision from the hub (or cache).
        hf_config = AutoConfig.from_pretrained(
            config.model,
            revision=config.revision,
            code_revision=config.code_revision,
            cache_dir=config.download_dir,
            local_files_only=hub_offline(),
            trust_remote_code=True,
        )
    else:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    return raw, hf_config


def _remote_code_reason(raw: dict) -> str | None:
    """Why transformers needs code from the model folder to build this config, or None."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type is None or model_type in CONFIG_MAPPING:
        return None
    auto_config = (raw.get("auto_map") or {}).get("AutoConfig")
    if auto_config:
        return (
            f"model_type {model_type!r} is unknown to transformers; its config class is "
            f"{auto_config!r} from auto_map"
        )
    return f"model_type {model_type!r} is unknown to transformers"


@dataclass
class _Skeleton:
    """A rank's model built on the meta device, with the facts it was built from."""

    raw: dict
    hf_config: Any
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    start: int
    end: int
    model: nn.Module


def _build_skeleton(config: WorkerConfig, path: pathlib.Path) -> _Skeleton:
    raw, hf_config = load_hf_config(path, config)
    if config.hf_overrides is not None:
        apply_hf_overrides(raw, hf_config, config.hf_overrides)
        logger.info("config of %s with --hf-overrides %s", config.model, config.hf_overrides)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, raw, device)
    cls = get_model_class(raw.get("architectures"))
    max_model_len = _max_model_len(config, hf_config, cls)
    start, end = layer_range(
        hf_config.get_text_config().num_hidden_layers,
        config.rank,
        config.pipeline_parallel_size,
        config.layer_partition(),
    )
    quant_config = resolve_quant_config(raw, config.quantization)
    state = parallel_state_of(config, start, end)
    check_tensor_parallel(cls, raw.get("architectures"), config.tensor_parallel_size)
    with _default_dtype(dtype), torch.device("meta"), parallel_state.use(state):
        if getattr(cls, "takes_parallel_state", False):
            model = cls(hf_config, state, max_model_len)
        else:  # model files that take the older positional stage arguments
            model = cls(hf_config, start, end, state.is_first, state.is_last, max_model_len)
        configure_kv_cache(model, config.kv_cache_dtype)
        if quant_config is not None:
            apply_quant_config(model, quant_config)
    if is_base_model(raw.get("architectures")):
        # NOTE: saved from AutoModel: names lack "model." and there is no lm_head (unused by
        # the pooling runner; it takes the embedding, as a tied one would).
        model.checkpoint_renames = (_BASE_MODEL_PREFIX, *getattr(model, "checkpoint_renames", ()))
        model.lm_head_from_embedding = True
    return _Skeleton(raw, hf_config, dtype, device, max_model_len, start, end, model)


def parallel_state_of(config: WorkerConfig, start: int, end: int) -> parallel_state.ParallelState:
    """The worker's place in the grid, for layers [start, end)."""
    return parallel_state.ParallelState(
        start,
        end,
        config.rank,
        config.pipeline_parallel_size,
        config.tp_rank,
        config.tensor_parallel_size,
        config.enable_expert_parallel,
        config.eplb.num_redundant_experts if config.eplb is not None else 0,
    )


def check_tensor_parallel(cls: type, architectures: list[str] | None, tp_size: int) -> None:
    """ValueError naming the architecture when it cannot be sharded over `tp_size` ranks."""
    if tp_size > 1 and not getattr(cls, "supports_tensor_parallel", False):
        from splitserve.worker.models.registry import MODEL_REGISTRY

        supported = sorted(
            n for n, c in MODEL_REGISTRY.items() if getattr(c, "supports_tensor_parallel", False)
        )
        name = (architectures or [cls.__name__])[0]
        raise ValueError(
            f"{name} does not support tensor parallelism (--tensor-parallel-size {tp_size}); "
            f"architectures that do: {', '.join(supported)}. Split it with "
            "--pipeline-parallel-size instead"
        )


def check_model(config: WorkerConfig) -> pathlib.Path:
    """Every load-time check of this rank, without reading weights: the folder and its config,
    the architecture, max_model_len, the weight files, and each owned tensor's name and
    shape (from the file headers). Raises ValueError / FileNotFoundError naming the problem;
    returns the resolved folder."""
    path = _resolve_folder(config)
    model = _build_skeleton(config, path).model
    sampling_defaults(config, path)
    if config.load_format != "dummy":
        load_weights(
            model,
            iterate_weights(
                path,
                config.load_format,
                _owned_by(model),
                read=read_shard_shapes,
                progress=False,
                ignore_patterns=config.weight_ignore_patterns(),
            ),
        )
    return path


def load_model(config: WorkerConfig) -> LoadedModel:
    """Build this rank's model slice on its device and fill its weights."""
    path = _resolve_folder(config)
    skeleton = _build_skeleton(config, path)
    model, hf_config, device = skeleton.model, skeleton.hf_config, skeleton.device
    model.to_empty(device=device)
    restore_weight_attrs(model)  # to_empty makes new parameter objects
    model.post_materialize()
    if config.load_format == "dummy":
        _init_dummy(model, config.seed)
    else:
        weights = iterate_weights(
            path,
            config.load_format,
            _owned_by(model),
            max_workers=config.max_parallel_loading_workers,
            ignore_patterns=config.weight_ignore_patterns(),
            desc=f"Loading {path.name if is_local_folder(config.model) else config.model} "
            f"(rank {config.rank})",
            # Tensor-parallel ranks read only their slices of each tensor.
            read=read_shard_lazily if config.tensor_parallel_size > 1 else None,
        )
        load_weights(model, weights)
    model.eval()
    log_kv_cache(model)
    _log_expert_placement(model)
    onednn = process_weights_after_loading(model)  # CPU float32: linears through oneDNN
    if onednn:
        logger.info("%d linear layers run through oneDNN", onednn)
    logger.info(
        "loaded %s layers [%d, %d) of %d as %s on %s",
        path.name,
        skeleton.start,
        skeleton.end,
        hf_config.get_text_config().num_hidden_layers,
        skeleton.dtype,
        device,
    )
    return LoadedModel(
        model,
        hf_config,
        path,
        skeleton.dtype,
        device,
        read_eos_token_ids(path, hf_config),
        skeleton.start,
        skeleton.end,
        skeleton.max_model_len,
        sampling_defaults(config, path),
    )


def _log_expert_placement(model: nn.Module) -> None:
    experts = next((m for m in model.modules() if isinstance(m, MoEExperts)), None)
    if experts is not None and experts.ep_size > 1 and experts.num_physical > experts.num_experts:
        first = experts.first_expert
        logger.info(
            "expert parallelism with EPLB: slots [%d, %d) of %d in every MoE layer on this "
            "rank, holding experts %s of %d until the first rebalance",
            first,
            first + experts.num_local_experts,
            experts.num_physical,
            experts.slot_experts,
            experts.num_experts,
        )
    elif experts is not None and experts.ep_size > 1:
        first = experts.first_expert
        logger.info(
            "expert parallelism: experts [%d, %d) of %d in every MoE layer on this rank",
            first,
            first + experts.num_local_experts,
            experts.num_experts,
        )


def _max_model_len(config: WorkerConfig, hf_config: Any, cls: type | None = None) -> int:
    text = hf_config.get_text_config()
    # NOTE: an encoder-decoder (Whisper) names its decoder's learned positions
    # max_target_positions: that bounds the decoder tokens a request may hold.
    field = "max_position_embeddings"
    if not getattr(text, field, None) and getattr(text, "max_target_positions", None):
        field = "max_target_positions"
    limit = int(getattr(text, field, 0) or 0)
    if config.max_model_len is None:
        default = getattr(cls, "default_max_model_len", None)
        if not limit and default is not None:
            # NOTE: a model without positions (state-space) has no context limit of its own.
            value = default(hf_config)
            logger.info("the config sets no context length; serving %d tokens", value)
            return value
        if not limit:
            raise ValueError("the model config has no max_position_embeddings; set max_model_len")
        return limit
    if limit and config.max_model_len > limit:
        raise ValueError(
            f"--max-model-len {config.max_model_len} is longer than the model's context "
            f"length ({field}={limit} in its config.json); use at most {limit}"
        )
    return config.max_model_len


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _init_dummy(model: nn.Module, seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            values = torch.empty(param.shape, dtype=torch.float32).uniform_(
                -1e-3, 1e-3, generator=generator
            )
            param.copy_(values)


def _owned_by(model: nn.Module) -> Callable[[str], bool]:
    """Predicate over checkpoint names: does this rank hold (or derive a tensor from) it?"""
    custom = getattr(model, "owns_weight", None)
    if custom is not None:
        return custom
    inner = model.model
    first, last = inner.embed_tokens is not None, model.lm_head is not None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tied = tied or getattr(model, "lm_head_from_embedding", False)
    renames: tuple[tuple[re.Pattern, str], ...] = getattr(model, "checkpoint_renames", ())

    def owned(name: str) -> bool:
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if m := _LAYER_RE.match(name):
            return inner.start_layer <= int(m.group(1)) < inner.end_layer
        if name.startswith("model.embed_tokens."):
            return first or (last and tied)  # a tied lm_head is the embedding
        if name.startswith(("model.norm.", "lm_head.")):
            return last
        return True

    return owned


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`: each name is looked up to (parameter, shard id)
    and handed to that parameter's `weight_loader` (fused q/k/v and gate/up shards, expert
    stacks and quantized tensors all place themselves); then check completeness.

    A tied (or missing) lm_head takes model.embed_tokens.weight. A model with a
    `checkpoint_name(name)` method renames checkpoint tensors to its module paths first; the
    model's `checkpoint_renames` ((pattern, replacement) pairs) rewrite names after that; its
    `checkpoint_ignore` pattern drops tensors it computes itself (no warning).
    """
    rename = getattr(model, "checkpoint_name", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    renames: tuple[tuple[re.Pattern, str], ...] = getattr(model, "checkpoint_renames", ())
    ignore: re.Pattern | None = getattr(model, "checkpoint_ignore", None)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    quant_config = getattr(model, "quant_config", None)
    expected = _expected_keys(model)
    loaded: set[tuple[str, str | None]] = set()
    embed: torch.Tensor | None = None
    for file_name, tensor in weights:
        name = rename(file_name) if rename is not None else file_name
        if _IGNORED_RE.search(name) or (ignore is not None and ignore.search(name)):
            continue
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if name == "model.embed_tokens.weight":
            embed = tensor
        if name == "lm_head.weight" and tied:
            continue  # a tied lm_head is the embedding, whatever the file also stores
        if load_kv_scale(model, modules, name, tensor):
            continue
        if quant_config is not None and quant_config.skips_tensor(name):
            continue
        try:
            target = _param_target(name, params, modules, packed)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {file_name}: {exc}") from None
        if target is _ELSEWHERE:
            continue  # an expert another expert-parallel rank holds: never read
        if target is None:
            if name != "model.embed_tokens.weight":
                logger.warning("ignoring checkpoint tensor %s: no such parameter", file_name)
            continue
        param_name, shard = target
        _load(params[param_name], tensor, shard, file_name)
        if shard is not None:
            loaded.add((param_name, shard))
        else:
            loaded.update((param_name, s) for s in getattr(params[param_name], "shard_ids", [None]))
    if "lm_head.weight" in params and ("lm_head.weight", None) not in loaded:
        if embed is None:
            raise ValueError(
                "lm_head.weight is missing and no model.embed_tokens.weight to tie it to"
            )
        _load(params["lm_head.weight"], embed, None, "lm_head.weight (tied to model.embed_tokens)")
        loaded.add(("lm_head.weight", None))
    missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} weights this rank needs: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )


def _param_target(
    name: str,
    params: dict[str, nn.Parameter],
    modules: dict[str, nn.Module],
    packed: dict[str, tuple[str, str]],
) -> tuple[str, str | None] | None:
    """The (parameter name, shard id) a checkpoint tensor loads into; None: no such parameter."""
    if (m := _EXPERT_RE.match(name)) and isinstance(
        experts := modules.get(m["module"]), MoEExperts
    ):
        target = experts.checkpoint_target(int(m["expert"]), m["proj"], m["param"])
        if target is None:
            return _ELSEWHERE
        return f"{m['module']}.{target[0]}", target[1]
    module_name, _, param_name = name.rpartition(".")
    head, _, leaf = module_name.rpartition(".")
    if leaf in packed:
        fused_name, shard = packed[leaf]
        fused = f"{head}.{fused_name}" if head else fused_name
        if f"{fused}.{param_name}" in params:
            return f"{fused}.{param_name}", shard
        if param_name == "bias" and isinstance(modules.get(fused), MergedLinear):
            raise ValueError(
                f"checkpoint has a bias for shard {shard!r} but the module was built without one"
            )
    return (name, None) if name in params else None


def _expected_keys(model: nn.Module) -> set[tuple[str, str | None]]:
    keys: set[tuple[str, str | None]] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        keys.update((name, shard) for shard in getattr(param, "shard_ids", [None]))
    return keys


def _load(param: torch.Tensor, tensor: torch.Tensor, shard: str | None, name: str) -> None:
    """`param.weight_loader(param, tensor, shard)`; a ValueError names the checkpoint tensor."""
    loader = getattr(param, "weight_loader", default_weight_loader)
    if not getattr(loader, "reads_slices", False):
        tensor = whole(tensor)
    try:
        loader(param, tensor, shard)
    except ValueError as exc:
        sep = " " if str(exc).startswith("has shape") else ": "
        raise ValueError(f"checkpoint tensor {name}{sep}{exc}") from None
