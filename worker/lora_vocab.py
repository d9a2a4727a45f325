"""LoRA extra vocabulary: tokens an adapter adds past the base model's vocabulary.

An adapter trained with added tokens carries, for ids V .. V+k-1 (V = the base model's
embedding rows), one new input-embedding row and one new lm_head row each. Three layouts hold
them, all read here into one `ExtraVocab`:

- peft `trainable_token_indices` (TrainableTokens): `<module>.token_adapter.trainable_tokens_delta`
  holds the rows at the indices adapter_config.json lists (the *values*, not differences: peft
  copies them over the rows). Only indices >= V are taken; an adapter that retrains base rows is
  refused.
- peft `modules_to_save` of embed_tokens / lm_head, or the embedding layers peft saves by itself
  when the vocabulary was resized: whole [V+k, H] matrices. Their first V rows must equal the base
  model's (only added rows are supported); the rows past V are the new tokens.
- the older `new_embeddings.safetensors`: `input_embeddings` and `output_embeddings`, [k, H].

The worker keeps only the rows its pipeline rank uses (embeddings on the first rank, lm_head rows
on the last). At run time `LoRAEmbedding` looks ids >= V up in the step's adapters' rows, and
`extend_logits` appends the lm_head rows' logits (-inf for rows without them), so every sampling
row sees V + lora_extra_vocab_size logits and base rows never pick an added token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitserve.common.lora import NEW_EMBEDDINGS_NAME, AdapterConfig

_VOCAB_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:.*\.)?(?P<module>embed_tokens|lm_head)"
    r"(?P<kind>\.token_adapter\.trainable_tokens_delta|\.token_adapter\.trainable_tokens_original"
    r"|\.token_adapter\.base_layer\.weight|\.modules_to_save(?:\.[A-Za-z0-9_-]+)?\.weight"
    r"|\.original_module\.weight|\.weight)$"
)
"""Adapter tensors of the embedding and lm_head (resized copies and TrainableTokens rows)."""
BASE_ROW_RTOL = 1e-3
BASE_ROW_ATOL = 1e-5
"""How close a resized matrix's first V rows must be to the base model's (dtype round trips)."""


@dataclass(slots=True)
class ExtraVocab:
    """Rows of the tokens an adapter adds (ids V .. V + num_tokens - 1)."""

    num_tokens: int
    embed: torch.Tensor | None
    """[num_tokens, H] input embeddings; None on ranks without embed_tokens."""
    lm_head: torch.Tensor | None
    """[num_tokens, H] lm_head rows; None on ranks without lm_head."""

    def to(self, device, dtype) -> ExtraVocab:
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return ExtraVocab(self.num_tokens, move(self.embed), move(self.lm_head))


def split_vocab_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """(the LoRA A/B tensors, {(module, kind): tensor} of embed_tokens / lm_head)."""
    lora: dict[str, torch.Tensor] = {}
    vocab: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _VOCAB_KEY.match(key)
        if m is None or ".lora_" in key:
            lora[key] = tensor
            continue
        kind = m["kind"]
        if kind.startswith(".modules_to_save"):
            kind = ".modules_to_save.weight"
        vocab[(m["module"], kind)] = tensor
    return lora, vocab


def read_extra_vocab(
    folder: Path,
    cfg: AdapterConfig,
    vocab: dict[tuple[str, str], torch.Tensor],
    base: dict[str, torch.Tensor | None],
    vocab_size: int,
    tied: bool,
    limit: int,
) -> ExtraVocab | None:
    """The adapter's added rows, checked; None when it adds no token.

    `base` maps embed_tokens / lm_head to this rank's base weight ([V, H], None where the rank
    lacks the module); `limit` is --lora-extra-vocab-size.
    """
    where = f"adapter {folder.name!r}"
    rows: dict[str, dict[int, torch.Tensor]] = {"embed_tokens": {}, "lm_head": {}}
    for module in rows:
        full = _whole_matrix(vocab, module)
        if full is None:
            continue
        _check_base_rows(where, module, full, base.get(module), vocab_size)
        for i in range(vocab_size, full.shape[0]):
            rows[module][i] = full[i]
    _take_trainable_tokens(where, cfg, vocab, rows, vocab_size)
    if tied and "lm_head" not in cfg.modules_to_save:
        # NOTE: peft keeps the tie: lm_head's added rows are the embedding's (its own saved
        # copy holds the rows as resized, before training).
        rows["lm_head"] = dict(rows["embed_tokens"])
    _take_new_embeddings(where, folder, rows, vocab_size)
    ids = sorted(set(rows["embed_tokens"]) | set(rows["lm_head"]))
    if not ids:
        return None
    k = len(ids)
    if ids != list(range(vocab_size, vocab_size + k)):
        raise ValueError(
            f"{where}: added token ids {ids[0]}..{ids[-1]} must run without gaps from the base "
            f"vocabulary size {vocab_size}"
        )
    if k > limit:
        raise ValueError(
            f"{where} adds {k} tokens to the vocabulary, more than --lora-extra-vocab-size "
            f"{limit}; start the server with --lora-extra-vocab-size {k} or more"
        )
    for module, got in rows.items():
        missing = [i for i in ids if i not in got]
        if missing:
            raise ValueError(
                f"{where}: {module} has no rows for added tokens {missing[:8]} (an added token "
                "needs both an input embedding and an lm_head row)"
            )
    stack = lambda m: torch.stack([rows[m][i].float() for i in ids])  # noqa: E731
    return ExtraVocab(
        k,
        stack("embed_tokens") if base.get("embed_tokens") is not None else None,
        stack("lm_head") if base.get("lm_head") is not None else None,
    )


def _whole_matrix(vocab: dict, module: str) -> torch.Tensor | None:
    """The resized matrix peft saved for `module` (modules_to_save wins over the base copy)."""
    for kind in (".modules_to_save.weight", ".token_adapter.base_layer.weight", ".weight"):
        t = vocab.get((module, kind))
        if t is not None:
            return t
    return None


def _check_base_rows(where, module, full, base, vocab_size) -> None:
    if full.dim() != 2 or full.shape[0] < vocab_size:
        raise ValueError(
            f"{where}: {module} is saved with shape {tuple(full.shape)}, fewer rows than the "
            f"base vocabulary {vocab_size}"
        )
    if base is None:
        return
    from splitserve.worker.cpu_linear import is_packed, unpack

    if is_packed(base):  # oneDNN's blocked lm_head on CPU: a plain temporary to compare
        base = unpack(base)
    if full.shape[1] != base.shape[1]:
        raise ValueError(
            f"{where}: {module} rows are {full.shape[1]} wide, the model's are {base.shape[1]}"
        )
    ours = full[:vocab_size].to(base.device, torch.float32)
    if not torch.allclose(ours, base.float(), rtol=BASE_ROW_RTOL, atol=BASE_ROW_ATOL):
        bad = int((~torch.isclose(ours, base.float(), BASE_ROW_RTOL, BASE_ROW_ATOL)).any(1).sum())
        raise ValueError(
            f"{where}: {module} changes {bad} rows of the base vocabulary; only rows past "
            f"{vocab_size} (tokens the adapter adds) are supported"
        )


def _take_trainable_tokens(where, cfg: AdapterConfig, vocab, rows, vocab_size) -> None:
    for module, ids in cfg.trainable_token_indices:
        delta = vocab.get((module, ".token_adapter.trainable_tokens_delta"))
        if delta is None:
            raise ValueError(f"{where}: trainable_token_indices name {module} but no rows for it")
        if delta.shape[0] != len(ids):
            raise ValueError(
                f"{where}: {module} has {delta.shape[0]} trainable token rows for {len(ids)} ids"
            )
        low = [t for t in ids if t < vocab_size]
        if low:
            raise ValueError(
                f"{where}: trainable_token_indices {low[:8]} retrain tokens of the base "
                f"vocabulary; only added tokens (ids >= {vocab_size}) are supported"
            )
        for t, row in zip(ids, delta, strict=True):
            rows[module][t] = row


def _take_new_embeddings(where, folder: Path, rows, vocab_size) -> None:
    path = folder / NEW_EMBEDDINGS_NAME
    if not path.exists():
        return
    real = path.resolve()
    if not real.is_relative_to(folder):
        raise ValueError(f"{path} is a link that leaves the adapter folder")
    from safetensors.torch import load_file

    tensors = load_file(str(real), device="cpu")
    unknown = sorted(set(tensors) - {"input_embeddings", "output_embeddings"})
    if unknown:
        raise ValueError(f"{where}: {NEW_EMBEDDINGS_NAME} holds unknown tensors {unknown}")
    for name, module in (("input_embeddings", "embed_tokens"), ("output_embeddings", "lm_head")):
        t = tensors.get(name)
        if t is None:
            continue
        for j in range(t.shape[0]):
            rows[module][vocab_size + j] = t[j]


@dataclass(slots=True)
class EmbedStep:
    """The step's added-token rows: one table of every active adapter's rows, and per token
    the offset of its adapter's block in it (ids >= V read table[offset + id - V])."""

    table: torch.Tensor
    """[sum k, H]"""
    offsets: torch.Tensor
    """int64 [T]"""


class LoRAEmbedding(nn.Module):
    """The base embedding, with ids >= V taken from the step's adapters' added rows."""

    def __init__(self, base: nn.Embedding, step_of) -> None:
        super().__init__()
        self.base = base
        self._step_of = step_of  # a callable: not a registered submodule
        self.vocab_size = base.num_embeddings

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        step: EmbedStep | None = self._step_of()
        if step is None:
            return self.base(input_ids)
        added = input_ids - self.vocab_size
        is_added = added >= 0
        out = self.base(torch.where(is_added, 0, input_ids))
        picked = step.table[(step.offsets + added).clamp(0, step.table.shape[0] - 1)]
        return torch.where(is_added[:, None], picked.to(out.dtype), out)


def extend_logits(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    width: int,
    groups: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """logits [N, V] -> [N, width]: -inf past V, except each group's (rows idx [M], lm_head
    rows [k, H]) logits of its added tokens in columns V .. V+k-1."""
    n, v = logits.shape
    extra = torch.full((n, width - v), float("-inf"), dtype=logits.dtype, device=logits.device)
    for idx, head in groups:
        k = head.shape[0]
        extra[idx, :k] = (hidden.index_select(0, idx) @ head.t()).to(logits.dtype)
    return torch.cat([logits, extra], dim=1)
