"""Checkpoint tensors read piecewise: a tensor-parallel rank reads only its slice of a file.

Under tensor parallelism (`model_loader` with --tensor-parallel-size > 1) safetensors files are
opened lazily: each tensor comes as a `LazyTensor`, and a weight loader that takes slices
(`reads_slices` on the loader) narrows it, which reads just those rows or columns from the
file (safetensors' `get_slice`). Every other loader gets the whole tensor, read then (norms,
routers and other tensors each rank holds whole).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import torch


class LazyTensor:
    """A tensor of an open safetensors file, read only when narrowed or materialized."""

    def __init__(self, handle, name: str) -> None:
        self._handle = handle
        self.name = name
        self.shape = torch.Size(handle.get_slice(name).get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows [start, start + length) along `dim`, read from the file."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._handle.get_slice(self.name)[tuple(index)]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """A leading-axis slice, read from the file."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous slices of a checkpoint tensor are read")
        return self.narrow(0, start, max(0, stop - start))

    def materialize(self) -> torch.Tensor:
        """The whole tensor."""
        return self._handle.get_tensor(self.name)


def whole(tensor) -> torch.Tensor:
    """`tensor` read whole if it is lazy."""
    return tensor.materialize() if isinstance(tensor, LazyTensor) else tensor


def reads_slices(loader: Callable) -> Callable:
    """Mark a weight loader that narrows what it is given (so a lazy tensor reaches it)."""
    loader.reads_slices = True
    return loader


def read_shard_lazily(
    file: pathlib.Path, kind: str, wanted: Callable[[str], bool]
) -> list[tuple[str, object]]:
    """Every wanted tensor of one file, as a `LazyTensor` (safetensors) or read whole (.bin /
    .pt, which cannot be read in part)."""
    from splitserve.worker.weight_files import read_shard

    if kind != "safetensors":
        return read_shard(file, kind, wanted)
    from safetensors import safe_open

    # NOTE: the handle stays open (memory-mapped) while a LazyTensor of it lives.
    handle = safe_open(str(file), framework="pt", device="cpu")
    return [(n, LazyTensor(handle, n)) for n in handle.keys() if wanted(n)]  # noqa: SIM118
