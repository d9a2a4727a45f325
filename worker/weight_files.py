"""Checkpoint weight files: which files a load format reads, and reading them shard by shard.

`iterate_weights` reads shards with a bounded pool of threads (`--max-parallel-loading-workers`)
and hands (name, tensor) pairs to the caller in file order, so at most `workers` shards are in
memory at a time besides the one being copied into the model. A tqdm bar on stderr (the
terminal of `splitserve serve`) counts shards; it stays silent when stderr is not a terminal.

`.bin` / `.pt` files are read with `torch.load(weights_only=True)`: a pickle holding anything but
tensors and plain containers is refused before any of its code could run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import pickle
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

Named = list[tuple[str, torch.Tensor]]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEXES = ("pytorch_model.bin.index.json", "model.bin.index.json", "pytorch_model.pt.index.json")
_PT_SUFFIXES = ("*.bin", "*.pt", "*.pth")
# Files of a training run that sit beside the weights in some checkpoints.
_PT_EXCLUDE = {
    "training_args.bin",
    "optimizer.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
}
DEFAULT_MAX_WORKERS = 8


@dataclass(frozen=True)
class WeightFiles:
    """The files one load reads, in order, and how to read them."""

    kind: str
    """"safetensors" or "pt"."""
    files: list[pathlib.Path]


def find_weight_files(
    path: pathlib.Path, load_format: str, ignore_patterns: list[str] | None = None
) -> WeightFiles:
    """The weight files of `path` for `load_format` (auto, safetensors or pt), less those
    matching `ignore_patterns` (globs relative to `path`, --ignore-patterns).

    `auto` takes safetensors when there are any, else .bin/.pt. A shard index
    (`*.index.json`) decides the file list when present; a shard it names must exist.
    """
    found = _find_weight_files(path, load_format)
    if not ignore_patterns:
        return found
    kept = [f for f in found.files if not _ignored(f.relative_to(path), ignore_patterns)]
    if not kept:
        raise FileNotFoundError(
            f"every {found.kind} weight file in {path} matches --ignore-patterns "
            f"{' '.join(ignore_patterns)}"
        )
    return WeightFiles(found.kind, kept)


def _ignored(relative: pathlib.PurePath, patterns: list[str]) -> bool:
    name = relative.as_posix()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _find_weight_files(path: pathlib.Path, load_format: str) -> WeightFiles:
    if load_format not in ("auto", "safetensors", "pt"):
        raise ValueError(f"load format {load_format!r} reads no weight files")
    if load_format in ("auto", "safetensors"):
        index = path / SAFETENSORS_INDEX
        if index.exists():
            return WeightFiles("safetensors", _indexed_files(index))
        safetensors = sorted(path.glob("*.safetensors"))
        if safetensors:
            return WeightFiles("safetensors", safetensors)
        if load_format == "safetensors":
            raise FileNotFoundError(
                f"--load-format safetensors: no *.safetensors files in {path}"
                + (" (it has .bin/.pt files: use --load-format pt)" if _pt_files(path) else "")
            )
    for name in PT_INDEXES:
        if (path / name).exists():
            return WeightFiles("pt", _indexed_files(path / name))
    pt = _pt_files(path)
    if not pt:
        raise FileNotFoundError(
            f"no weight files in {path}: --load-format {load_format} looks for "
            + ("*.safetensors, then " if load_format == "auto" else "")
            + "*.bin / *.pt / *.pth (use --load-format dummy for random weights)"
        )
    return WeightFiles("pt", pt)


def _pt_files(path: pathlib.Path) -> list[pathlib.Path]:
    found = {p for pattern in _PT_SUFFIXES for p in path.glob(pattern)}
    return sorted(p for p in found if p.name not in _PT_EXCLUDE)


def _indexed_files(index: pathlib.Path) -> list[pathlib.Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is not a shard index with a weight_map: {exc}") from exc
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{index.name} in {index.parent} lists shard files that are missing: "
            f"{', '.join(missing)}"
        )
    return files


def read_shard(file: pathlib.Path, kind: str, wanted: Callable[[str], bool]) -> Named:
    """Every wanted tensor of one file, read into CPU memory."""
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            return [(n, f.get_tensor(n)) for n in f.keys() if wanted(n)]  # noqa: SIM118
    state = load_pt(file, mmap=False)
    return [(n, t) for n, t in state.items() if wanted(n)]


def read_shard_shapes(file: pathlib.Path, kind: str, wanted: Callable[[str], bool]) -> Named:
    """Every wanted tensor of one file as a meta tensor of its shape (no data is read)."""
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return [
                    (n, torch.empty(f.get_slice(n).get_shape(), device="meta"))
                    for n in f.keys()  # noqa: SIM118
                    if wanted(n)
                ]
        except SafetensorError as exc:  # truncated or not a safetensors file at all
            raise ValueError(f"checkpoint file {file} cannot be read: {exc}") from exc
    state = load_pt(file, mmap=True)
    return [(n, torch.empty(t.shape, device="meta")) for n, t in state.items() if wanted(n)]


def load_pt(file: pathlib.Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a torch checkpoint, unpickling tensors only."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            # A checkpoint in torch's legacy (pre-zip) layout cannot be memory-mapped.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {file}: it holds more than tensors, and splitserve reads .bin/.pt "
            f"checkpoints with torch.load(weights_only=True) only, never running pickled code "
            f"({reason}). Convert the checkpoint to safetensors."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{file} is not a state dict of named tensors")
    return state


def resolve_workers(requested: int | None, num_files: int) -> int:
    """Threads for `num_files` shards: `requested`, else min(8, CPUs), never above the files."""
    limit = requested or min(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)
    return max(1, min(limit, num_files))


def iterate_weights(
    path: pathlib.Path,
    load_format: str,
    wanted: Callable[[str], bool],
    max_workers: int | None = 1,
    read: Callable[[pathlib.Path, str, Callable[[str], bool]], Named] | None = None,
    desc: str | None = None,
    progress: bool = True,
    ignore_patterns: list[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, CPU tensor) for every tensor `wanted` accepts, shard by shard.

    `read` (default `read_shard`) reads one file; `max_workers` files are read at a time.
    """
    read = read or read_shard
    found = find_weight_files(path, load_format, ignore_patterns)
    workers = resolve_workers(max_workers, len(found.files))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(found.files),
        desc=desc or f"Loading {found.kind} checkpoint shards",
        unit="shard",
        disable=None if progress else True,  # None: silent when stderr is not a terminal
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        if workers == 1:
            for file in found.files:
                yield from read(file, found.kind, wanted)
                bar.update()
            return
        yield from _pooled(found, wanted, workers, read, bar)


def _pooled(
    found: WeightFiles, wanted, workers: int, read, bar
) -> Iterator[tuple[str, torch.Tensor]]:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitserve-load")
    files = iter(found.files)
    pending: deque[Future[Named]] = deque()

    def submit_next() -> None:
        file = next(files, None)
        if file is not None:
            pending.append(pool.submit(read, file, found.kind, wanted))

    try:
        for _ in range(workers):
            submit_next()
        while pending:
            tensors = pending.popleft().result()
            submit_next()
            yield from tensors
            del tensors
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
