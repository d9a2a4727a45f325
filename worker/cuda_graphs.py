"""CUDA-graph capture sizes and a runner that replays one graph per padded batch size.

Decode steps are launch-bound at small batch sizes: a graph replays the whole forward with one
launch. Graphs have fixed shapes, so a handful of batch sizes is captured at start-up and a
step of n sequences runs the smallest captured size >= n with the extra rows padded.
Sizes and eager/graph choice follow vLLM's flags (`--enforce-eager`,
`--max-seq-len-to-capture`, `--cuda-graph-sizes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

# vLLM's default ceiling on captured batch sizes.
DEFAULT_MAX_CAPTURE_SIZE = 512


def _pattern(cap: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to cap (vLLM's spacing)."""
    return [s for s in (1, 2, 4) if s <= cap] + list(range(8, cap + 1, 8))


def capture_sizes(
    max_num_seqs: int,
    cuda_graph_sizes: list[int] | None = None,
    max_capture_size: int | None = None,
) -> list[int]:
    """Batch sizes to capture, ascending.

    Args:
        max_num_seqs: the scheduler's batch cap; by default sizes stop at it rounded up to 8.
        cuda_graph_sizes: as vLLM's `--cuda-graph-sizes`: one value N means the default pattern
            up to N; several values are used as given.
        max_capture_size: hard ceiling; defaults to 512.

    Returns:
        Sorted distinct sizes (possibly empty when the ceiling is below 1).
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_capture_size is not None and max_capture_size < 0:
        raise ValueError(f"max_capture_size must be >= 0, got {max_capture_size}")
    ceiling = DEFAULT_MAX_CAPTURE_SIZE if max_capture_size is None else max_capture_size
    if cuda_graph_sizes:
        bad = [s for s in cuda_graph_sizes if not isinstance(s, int) or s < 1]
        if bad:
            raise ValueError(f"cuda_graph_sizes must be positive ints, got {bad}")
        sizes = _pattern(cuda_graph_sizes[0]) if len(cuda_graph_sizes) == 1 else cuda_graph_sizes
    else:
        # A batch never exceeds max_num_seqs; round up so the last graph still covers it.
        sizes = _pattern(-(-max_num_seqs // 8) * 8)
    return sorted({s for s in sizes if s <= ceiling})


def padded_batch_size(n: int, sizes: Sequence[int]) -> int | None:
    """Smallest captured size >= n, or None when n exceeds them all (run eager)."""
    for size in sorted(sizes):
        if size >= n:
            return size
    return None


def should_run_eager(
    batch_size: int,
    max_seq_len: int,
    sizes: Sequence[int],
    max_seq_len_to_capture: int,
    enforce_eager: bool,
) -> bool:
    """True when this step cannot (or must not) replay a graph.

    Graphs are captured for decode kernels sized to max_seq_len_to_capture, so longer contexts
    run eager, as do batches beyond the largest captured size, and everything under
    --enforce-eager.
    """
    if enforce_eager or not sizes or batch_size < 1:
        return True
    return batch_size > max(sizes) or max_seq_len > max_seq_len_to_capture


class CudaGraphRunner:
    """Capture `fn` once per batch size and replay it on padded inputs.

    `fn(*inputs) -> Tensor` must take tensors whose dim 0 is the batch (plus a fixed offset:
    an input of shape [B + k, ...], such as cu_seqlens with k = 1, is sliced to [s + k] for
    size s) and must only do graph-safe work (no host syncs, no allocation-dependent Python
    branching on values). Static input buffers hold the largest size; the graph of size s
    reads their first s (+ k) rows, so all graphs share them.

    Without CUDA (or before `capture`), `run` calls `fn` eagerly on the same padded buffers,
    which keeps the padding semantics testable anywhere.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        example_inputs: Sequence[torch.Tensor],
        sizes: Sequence[int],
        *,
        pad_values: Sequence[float | int] | None = None,
        warmup_iters: int = 2,
    ) -> None:
        if not sizes:
            raise ValueError("CudaGraphRunner needs at least one capture size")
        self.fn = fn
        self.sizes = sorted(set(sizes))
        self.max_size = self.sizes[-1]
        self.warmup_iters = warmup_iters
        self._init_static_inputs(example_inputs, pad_values)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _init_static_inputs(
        self, example_inputs: Sequence[torch.Tensor], pad_values: Sequence[float | int] | None
    ) -> None:
        if pad_values is None:
            pad_values = [0] * len(example_inputs)
        if len(pad_values) != len(example_inputs):
            raise ValueError(f"{len(pad_values)} pad values for {len(example_inputs)} inputs")
        self.pad_values = list(pad_values)
        # Offsets k from the example's leading dim: examples are given at the largest size.
        self.offsets = [t.shape[0] - self.max_size for t in example_inputs]
        if any(k < 0 for k in self.offsets):
            raise ValueError(
                f"example inputs must have dim 0 >= the largest size {self.max_size}, got "
                f"{[tuple(t.shape) for t in example_inputs]}"
            )
        self.static_inputs = [t.detach().clone() for t in example_inputs]

    def _views(self, size: int) -> list[torch.Tensor]:
        return [t[: size + k] for t, k in zip(self.static_inputs, self.offsets, strict=True)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per size, largest first, in one shared memory pool."""
        if not torch.cuda.is_available() or self.static_inputs[0].device.type != "cuda":
            raise RuntimeError("CUDA graph capture needs CUDA tensors")
        for size in reversed(self.sizes):
            views = self._views(size)
            # Warm-up on a side stream lets lazy init (cuBLAS handles, Triton autotune/compile)
            # happen outside capture, where it would be illegal.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self.fn(*views)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Capturing the largest size first sizes the pool; smaller graphs reuse its memory.
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self.fn(*views)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for batch sizes %s", len(self.graphs), self.sizes)

    def can_run(self, batch_size: int) -> bool:
        """True when some captured size fits batch_size."""
        return padded_batch_size(batch_size, self.sizes) is not None

    def _stage(self, inputs: Sequence[torch.Tensor]) -> tuple[int, int]:
        """Copy inputs into the static buffers and pad them; returns (n, padded size)."""
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        n = inputs[0].shape[0] - self.offsets[0]
        size = padded_batch_size(n, self.sizes)
        if size is None:
            raise ValueError(f"batch {n} exceeds the largest captured size {self.max_size}")
        for src, dst, k, pad in zip(
            inputs, self.static_inputs, self.offsets, self.pad_values, strict=True
        ):
            if src.shape[0] != n + k or src.shape[1:] != dst.shape[1:]:
                raise ValueError(f"input {tuple(src.shape)} does not fit buffer {tuple(dst.shape)}")
            dst[: n + k].copy_(src, non_blocking=True)
            if size > n:
                dst[n + k : size + k].fill_(pad)
        return n, size

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) via the graph of the padded size; returns the first n output rows.

        NOTE: the result is a view of the graph's static output; it is overwritten by the next
        `run`, so consume (or clone) it first.
        """
        n, size = self._stage(inputs)
        graph = self.graphs.get(size)
        if graph is None:
            out = self.fn(*self._views(size))
        else:
            graph.replay()
            out = self.outputs[size]
        return out[:n]
