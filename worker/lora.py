"""LoRA on the worker: peft adapters loaded per request, applied per row of a mixed batch.

`LoRAManager.wrap` puts a `LoRALinear` around every projection an adapter may target
(qkv_proj, o_proj, gate_up_proj, down_proj). Per step, `begin_step` groups the step's tokens
by adapter; each wrapped projection then adds, per adapter in the batch (a loop over distinct
adapters, never over tokens), `scale * (x[idx] @ A^T) @ B^T` into its output rows `idx`.

For a fused projection the shards' A matrices are stacked ([n*r, in]) and their B matrices
laid out block-diagonally ([out, n*r], rows at each shard's offset), so one pair of matmuls
serves q, k and v (or gate and up) together. The scale is folded into B at load time.

The scheduler decides what this worker holds (`scheduler/lora_residency.py`): a step message
names the adapters to drop (`lora_evictions`, its LRU over --max-cpu-loras) and the device slots
to fill (`lora_slots`, its slot table over --max-loras); a new request naming an adapter not in
CPU memory has it read from disk. Every path is re-checked against the worker's own allowed
roots before a file is opened.

An adapter may also add tokens (`lora_vocab.py`): with --lora-extra-vocab-size E > 0 the
embedding is wrapped so that ids >= V read the step's adapters' added rows, and `extend_logits`
widens every step's logits to V + E (-inf wherever a row's adapter adds no such token).

Both caches are keyed by (name, lora_int_id): the scheduler numbers every load of an adapter, so
an adapter unloaded and loaded again (say its files were rewritten) is read from disk afresh,
while requests still running on the old load keep the old weights until they finish.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitserve.common.lora import (
    adapter_weight_file,
    allowed_roots,
    parse_lora_modules,
    read_adapter_config,
    resolve_adapter_path,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.linear import Linear, MergedLinear
from splitserve.worker.lora_vocab import (
    EmbedStep,
    ExtraVocab,
    LoRAEmbedding,
    extend_logits,
    read_extra_vocab,
    split_vocab_tensors,
)

logger = logging.getLogger(__name__)

WRAPPED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<prefix>.+)\.(?P<module>[a-z_]+_proj)"
    r"\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_MOE_KEY = re.compile(
    r"^(?:base_model\.model\.)?"
    r"(?P<module>.+?\.(?:experts(?:\.\S+?)?|block_sparse_moe\.gate|mlp\.gate))\.lora_[AB]\b"
)
"""Adapter tensors on MoE experts (per expert or stacked) or on the router."""

AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Wrapped module name -> (A [n*r, in], scale * B [out, n*r])."""
AdapterKey = tuple[str, int]
"""(adapter name, load number): one load of an adapter."""


@dataclass(slots=True)
class _Loaded:
    path: str
    weights: AdapterWeights
    extra: ExtraVocab | None = None
    """Rows of the tokens the adapter adds (None: it adds none)."""


class LoRALinear(nn.Module):
    """A projection plus the low-rank deltas of the step's adapters, row by row."""

    def __init__(self, base: nn.Linear | Linear, name: str, manager: LoRAManager) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self._manager = [manager]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for weights, idx in self._manager[0].active:
            pair = weights.get(self.name)
            if pair is None:
                continue
            a, b = pair
            if idx is None:  # every token of the step uses this adapter
                y.add_((x @ a.t()) @ b.t())
            else:
                y.index_add_(0, idx, (x.index_select(0, idx) @ a.t()) @ b.t())
        return y


class LoRAManager:
    """Adapters of one worker rank: loading, CPU/device LRUs, and the step's token groups."""

    def __init__(self, config: WorkerConfig, model: nn.Module, device, dtype) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.roots = allowed_roots(config.lora_root, parse_lora_modules(config.lora_modules))
        self.cpu: dict[AdapterKey, _Loaded] = {}
        self.slots: dict[int, AdapterKey] = {}
        """Device slot -> the adapter the scheduler put in it."""
        self.on_device: dict[AdapterKey, AdapterWeights] = {}
        """Device copies of the adapters in slots (made when a step first uses one)."""
        self.request_adapter: dict[str, AdapterKey] = {}
        self.active: list[tuple[AdapterWeights, torch.Tensor | None]] = []
        self._targets = self._wrap()
        self._init_vocab()

    @property
    def max_loras(self) -> int:
        # NOTE: read from the config, which takes the scheduler's value at Describe.
        return self.config.max_loras

    # ------------------------------------------------------------------ model surgery

    def _wrap(self) -> dict[str, nn.Module]:
        """Replace each target projection by a LoRALinear; returns name -> base module."""
        targets: dict[str, nn.Module] = {}
        for name, module in list(self.model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in WRAPPED and isinstance(module, (nn.Linear, Linear)):
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, attr, LoRALinear(module, name, self))
                targets[name] = module
        return targets

    def _init_vocab(self) -> None:
        """The base vocabulary, this rank's embedding / lm_head weights, and (with
        --lora-extra-vocab-size) the embedding wrapped to read added rows."""
        self.extra_vocab_size = self.config.lora_extra_vocab_size or 0
        self.extra_on_device: dict[AdapterKey, ExtraVocab] = {}
        self.embed_step: EmbedStep | None = None
        embed = head = None
        for name, module in list(self.model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "embed_tokens" and isinstance(module, nn.Embedding):
                embed = module
                if self.extra_vocab_size:
                    parent_name, _, attr = name.rpartition(".")
                    wrapper = LoRAEmbedding(module, lambda: self.embed_step)
                    setattr(self.model.get_submodule(parent_name), attr, wrapper)
            elif leaf == "lm_head" and isinstance(module, (nn.Linear, Linear)):
                head = module
        self.base_vocab = {
            "embed_tokens": None if embed is None else embed.weight,
            "lm_head": None if head is None else head.weight,
        }
        hf = getattr(self.model, "config", None)
        hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        self.vocab_size = int(hf.vocab_size)
        self.hidden_size = int(hf.hidden_size)
        self.tied = bool(getattr(hf, "tie_word_embeddings", False))

    @property
    def logits_width(self) -> int:
        """Columns of every step's logits: the base vocabulary plus the extra vocabulary."""
        return self.vocab_size + self.extra_vocab_size

    def extra_vocab_bytes(self) -> int:
        """Device bytes the added rows may take (--max-loras slots of --lora-extra-vocab-size
        rows: an embedding row on the first rank, an lm_head row on the last), for the memory
        profile; their logits columns are part of the profiled step."""
        item = torch.empty((), dtype=self.dtype).element_size()
        ranks = int(self.config.is_first_rank) + int(self.config.is_last_rank)
        rows = self.max_loras * self.extra_vocab_size * ranks
        return rows * self.hidden_size * item

    def vocab_limit(self, request_id: str) -> int:
        """Token ids of this request lie below this: V plus what its adapter adds."""
        key = self.request_adapter.get(request_id)
        loaded = None if key is None else self.cpu.get(key)
        extra = 0 if loaded is None or loaded.extra is None else loaded.extra.num_tokens
        return self.vocab_size + extra

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, name: str, path: str, int_id: int = 0) -> str | None:
        """Make the request's adapter (load `int_id` of `name`) resident in CPU memory; an
        error message, or None."""
        key = (name, int_id)
        try:
            self._load(key, path)
        except (ValueError, OSError, RuntimeError) as exc:
            return f"cannot load LoRA adapter {name!r}: {exc}"
        self.request_adapter[request_id] = key
        return None

    def remove_request(self, request_id: str) -> None:
        self.request_adapter.pop(request_id, None)

    def _load(self, key: AdapterKey, path: str) -> _Loaded:
        loaded = self.cpu.get(key)
        if loaded is not None and loaded.path == path:
            return loaded
        if loaded is not None and key in self.request_adapter.values():
            # NOTE: replacing the weights under a running request would change its output
            # mid-generation; a new path needs a new load number.
            raise ValueError(
                f"lora_int_id {key[1]} is in use from {loaded.path}; a request for {path} "
                "needs another lora_int_id"
            )
        folder = resolve_adapter_path(path, self.roots)
        loaded = self._read(path, folder)
        self.on_device.pop(key, None)
        self.extra_on_device.pop(key, None)  # a reloaded adapter must not keep stale device weights
        self.cpu[key] = loaded
        logger.info("LoRA adapter %r (load %d) read from %s", key[0], key[1], folder)
        return loaded

    # ------------------------------------------------------------------ placement

    def evict(self, keys: list[AdapterKey]) -> None:
        """Drop adapters from CPU memory and their device slots (the scheduler's LRU)."""
        for key in keys:
            if self.cpu.pop(key, None) is not None:
                logger.info("LoRA adapter %r (load %d) evicted from memory", *key)
            self._drop_slot(key)

    def place(self, slots: list[tuple[AdapterKey, int]]) -> None:
        """Put each adapter in its device slot (the scheduler's slot table), replacing what
        the slot held; its device copy is made when a step first uses it."""
        for key, slot in slots:
            if not 0 <= slot < self.max_loras:
                raise RuntimeError(f"LoRA slot {slot} is outside [0, {self.max_loras})")
            old = self.slots.get(slot)
            if old is not None:
                self.on_device.pop(old, None)
                self.extra_on_device.pop(old, None)
            self._drop_slot(key)
            self.slots[slot] = key

    def _drop_slot(self, key: AdapterKey) -> None:
        self.on_device.pop(key, None)
        self.extra_on_device.pop(key, None)
        for slot, held in list(self.slots.items()):
            if held == key:
                del self.slots[slot]

    def _read(self, path: str, folder: Path) -> _Loaded:
        cfg = read_adapter_config(folder, self.config.max_lora_rank)
        weight_file = adapter_weight_file(folder)
        if weight_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weight_file), device="cpu")
        else:
            tensors = torch.load(weight_file, map_location="cpu", weights_only=True)
        tensors, vocab = split_vocab_tensors(tensors)
        extra = read_extra_vocab(
            folder,
            cfg,
            vocab,
            self.base_vocab,
            self.vocab_size,
            self.tied,
            self.extra_vocab_size,
        )
        return _Loaded(path, self._pack(tensors, cfg.rank, cfg.scaling, folder.name), extra)

    def _pack(
        self, tensors: dict[str, torch.Tensor], rank: int, scale: float, adapter: str
    ) -> AdapterWeights:
        """peft tensors -> per wrapped module (A stacked, B block-diagonal and scaled)."""
        packed_modules = getattr(self.model, "packed_modules", {})
        shards: dict[str, dict[str | None, dict[str, torch.Tensor]]] = {}
        for key, tensor in tensors.items():
            if moe := _MOE_KEY.match(key):
                raise ValueError(
                    f"adapter {adapter!r}: {key!r} targets the MoE module {moe['module']}; "
                    "LoRA on MoE experts and routers is not supported (attention "
                    "projections and dense MLPs are)"
                )
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {adapter!r}: unsupported tensor {key!r}")
            module = m["module"]
            fused, shard = packed_modules.get(module, (module, None))
            target = f"{m['prefix']}.{fused}"
            if target not in self._targets:
                if self._other_rank(m["prefix"]):
                    continue
                raise ValueError(f"adapter {adapter!r}: {key!r} targets no module of this model")
            shards.setdefault(target, {}).setdefault(shard, {})[m["ab"]] = tensor
        out: AdapterWeights = {}
        for target, by_shard in shards.items():
            out[target] = self._pack_module(target, by_shard, rank, scale, adapter)
        return out

    def _other_rank(self, prefix: str) -> bool:
        """Whether `prefix` (model.layers.N....) is a layer another pipeline rank owns."""
        m = re.match(r"^(.*\.layers)\.(\d+)\.", prefix + ".")
        if m is None:
            return False
        try:
            layer = self.model.get_submodule(f"{m[1]}.{m[2]}")
        except AttributeError:
            return False
        return isinstance(layer, nn.Identity)

    def _pack_module(self, target, by_shard, rank, scale, adapter):
        base = self._targets[target]
        if isinstance(base, MergedLinear):
            order = [s for s in base.shard_offsets if s in by_shard]
            sizes = {s: base.shard_sizes[s] for s in order}
            offsets = {s: base.shard_offsets[s] for s in order}
        else:
            order = [None]
            sizes, offsets = {None: base.out_features}, {None: 0}
        a_all = torch.zeros(len(order) * rank, base.in_features, dtype=torch.float32)
        b_all = torch.zeros(base.out_features, len(order) * rank, dtype=torch.float32)
        for j, shard in enumerate(order):
            pair = by_shard.get(shard, {})
            if set(pair) != {"A", "B"}:
                raise ValueError(f"adapter {adapter!r}: {target} ({shard}) lacks lora_A or lora_B")
            a, b = pair["A"], pair["B"]
            if tuple(a.shape) != (rank, base.in_features) or tuple(b.shape) != (
                sizes[shard],
                rank,
            ):
                raise ValueError(
                    f"adapter {adapter!r}: {target} ({shard}) has lora_A {tuple(a.shape)} and "
                    f"lora_B {tuple(b.shape)}, expected ({rank}, {base.in_features}) and "
                    f"({sizes[shard]}, {rank})"
                )
            a_all[j * rank : (j + 1) * rank] = a.float()
            start = offsets[shard]
            b_all[start : start + sizes[shard], j * rank : (j + 1) * rank] = b.float() * scale
        return a_all, b_all

    # ------------------------------------------------------------------ steps

    def begin_step(self, req_ids: list[str], counts: np.ndarray) -> None:
        """Group the step's tokens (rows in order, `counts` tokens each) by adapter."""
        names = [self.request_adapter.get(rid) for rid in req_ids]
        distinct = sorted({n for n in names if n is not None})
        self.active = []
        self.embed_step = None
        if not distinct:
            return
        if len(distinct) > self.max_loras:
            raise RuntimeError(
                f"a step uses {len(distinct)} LoRA adapters but max_loras is {self.max_loras}"
            )
        code = {key: j for j, key in enumerate(distinct)}
        token_codes = np.repeat(np.array([code.get(n, -1) for n in names]), counts)
        placed = set(self.slots.values())
        for j, name in enumerate(distinct):
            if name not in placed:
                raise RuntimeError(
                    f"LoRA adapter {name[0]!r} (load {name[1]}) is in no device slot: the "
                    "scheduler places every adapter a step uses"
                )
            weights = self.on_device.get(name)
            if weights is None:
                weights = self.on_device[name] = self._to_device(self.cpu[name])
            if len(distinct) == 1 and all(n is not None for n in names):
                self.active.append((weights, None))
                continue
            idx = np.flatnonzero(token_codes == j)
            self.active.append((weights, torch.from_numpy(idx).to(self.device)))
        self._begin_embed_step(distinct, token_codes)

    def _begin_embed_step(self, distinct: list[AdapterKey], token_codes: np.ndarray) -> None:
        """The step's added-token rows for the wrapped embedding (none: it runs as the base)."""
        tables, starts, start = [], np.zeros(len(distinct), np.int64), 0
        for j, key in enumerate(distinct):
            extra = self._extra(key)
            if extra is None or extra.embed is None:
                continue
            tables.append(extra.embed)
            starts[j] = start
            start += extra.num_tokens
        if not tables or not self.extra_vocab_size:
            return
        offsets = np.where(token_codes >= 0, starts[np.maximum(token_codes, 0)], 0)
        self.embed_step = EmbedStep(torch.cat(tables), torch.from_numpy(offsets).to(self.device))

    def _extra(self, key: AdapterKey) -> ExtraVocab | None:
        """The device copy of an adapter's added rows (made on first use), or None."""
        extra = self.extra_on_device.get(key)
        if extra is None:
            loaded = self.cpu[key].extra
            if loaded is None:
                return None
            extra = self.extra_on_device[key] = loaded.to(self.device, self.dtype)
        return extra

    def extend_logits(
        self, hidden: torch.Tensor, logits: torch.Tensor, req_ids: list[str | None]
    ) -> torch.Tensor:
        """logits [N, V] of rows of `req_ids` -> [N, logits_width]: each row's adapter's added
        tokens, -inf where its adapter (or the base model) has none."""
        groups: dict[AdapterKey, list[int]] = {}
        for i, rid in enumerate(req_ids):
            key = self.request_adapter.get(rid) if rid is not None else None
            if key is not None:
                groups.setdefault(key, []).append(i)
        heads = []
        for key, rows in groups.items():
            extra = self._extra(key)
            if extra is not None and extra.lm_head is not None:
                heads.append((torch.tensor(rows, device=logits.device), extra.lm_head))
        return extend_logits(hidden, logits, self.logits_width, heads)

    def end_step(self) -> None:
        self.active = []
        self.embed_step = None

    @contextmanager
    def step(self, req_ids: list[str | None], plan):
        """begin_step over the rows of `plan` (a StepPlan; `req_ids` by batch row) for the
        forward pass, end_step after it."""
        self.begin_step([req_ids[r] for r in plan.rows.tolist()], plan.counts)
        try:
            yield
        finally:
            self.end_step()

    def _to_device(self, loaded: _Loaded) -> AdapterWeights:
        return {
            k: (a.to(self.device, self.dtype), b.to(self.device, self.dtype))
            for k, (a, b) in loaded.weights.items()
        }
