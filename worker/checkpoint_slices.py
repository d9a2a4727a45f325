"""Checkpoint tensors read piecewise: a tensor-parallel rank reads only its slice of a file.

Under tensor parallelism (`model_loader` with --tensor-parallel-size > 1) weight files are
opened lazily: each tensor comes as a `LazyTensor`, and a weight loader that takes slices
(`reads_slices` on the loader) narrows it, which copies just those rows or columns out of the
file. Every other loader gets the whole tensor, read then (norms, routers and other tensors
each rank holds whole).

Two sources back a `LazyTensor`: an open safetensors file (safetensors' `get_slice`), and a
.bin / .pt state dict loaded with `torch.load(mmap=True, weights_only=True)`, whose tensors
are views of the memory-mapped file until a slice of one is copied out. A .bin in torch's
legacy (pre-zip) layout cannot be mapped; it is read whole, once per rank, as before.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import torch


class _SafetensorsSource:
    """Tensors of an open safetensors file (memory-mapped by safetensors)."""

    def __init__(self, handle) -> None:
        # NOTE: the handle stays open while a LazyTensor of it lives.
        self._handle = handle

    def names(self) -> list[str]:
        return list(self._handle.keys())

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._handle.get_slice(name)[index]

    def read_whole(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


class _MappedStateSource:
    """Tensors of a torch state dict loaded with mmap=True (or in memory for a legacy file)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        # NOTE: the mapping stays open while a LazyTensor of it lives (its storages hold it).
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> torch.Size:
        return self._state[name].shape

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        # A copy, so only the slice's pages of the file are read and no view of it escapes.
        return self._state[name][index].clone(memory_format=torch.contiguous_format)

    def read_whole(self, name: str) -> torch.Tensor:
        return self._state[name].clone(memory_format=torch.contiguous_format)


class LazyTensor:
    """A tensor of a checkpoint file, read only when narrowed or materialized."""

    def __init__(self, source: _SafetensorsSource | _MappedStateSource, name: str) -> None:
        self._source = source
        self.name = name
        self.shape = source.shape(name)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows [start, start + length) along `dim`, read from the file."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._source.read(self.name, tuple(index))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """A leading-axis slice, read from the file."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous slices of a checkpoint tensor are read")
        return self.narrow(0, start, max(0, stop - start))

    def materialize(self) -> torch.Tensor:
        """The whole tensor."""
        return self._source.read_whole(self.name)


def whole(tensor) -> torch.Tensor:
    """`tensor` read whole if it is lazy."""
    return tensor.materialize() if isinstance(tensor, LazyTensor) else tensor


def reads_slices(loader: Callable) -> Callable:
    """Mark a weight loader that narrows what it is given (so a lazy tensor reaches it)."""
    loader.reads_slices = True
    return loader


def read_shard_lazily(
    file: pathlib.Path, kind: str, wanted: Callable[[str], bool]
) -> list[tuple[str, LazyTensor]]:
    """Every wanted tensor of one file, as a `LazyTensor`: safetensors through `safe_open`,
    .bin / .pt through a memory-mapped `torch.load(weights_only=True)` (never running
    pickled code)."""
    source: _SafetensorsSource | _MappedStateSource
    if kind == "safetensors":
        from safetensors import safe_open

        source = _SafetensorsSource(safe_open(str(file), framework="pt", device="cpu"))
    else:
        from splitserve.worker.weight_files import load_pt

        source = _MappedStateSource(load_pt(file, mmap=True))
    return [(n, LazyTensor(source, n)) for n in source.names() if wanted(n)]
