"""CUDA graphs for decode steps: capture sizes, a generic capture/replay runner, and
`DecodeGraphs`, which runs a model slice's decode-only steps through it.

Decode steps are launch-bound at small batch sizes: a graph replays the whole forward with one
launch. Graphs have fixed shapes, so a handful of batch sizes is captured at start-up and a
step of n sequences runs the smallest captured size >= n with the extra rows padded (seq_len 0
and cache slot -1: they write nothing and read nothing). Sizes and the eager/graph choice
follow vLLM's flags (`--enforce-eager`, `--max-seq-len-to-capture`, `--cuda-graph-sizes`,
`--max-cudagraph-capture-size`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from splitserve.worker.attention import AttentionBackend, AttentionMetadata, forward_context
from splitserve.worker.pipeline import IntermediateTensors

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


Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _head(out: Outputs, n: int) -> Outputs:
    if isinstance(out, torch.Tensor):
        return out[:n]
    return tuple(t[:n] for t in out)


class CudaGraphRunner:
    """Capture `fn` once per batch size and replay it on padded inputs.

    `fn(*inputs)` returns a tensor or a tuple of tensors whose dim 0 is the batch. Its inputs'
    dim 0 is the batch plus a fixed offset (an input of shape [B + k, ...], such as cu_seqlens
    with k = 1, is sliced to [s + k] for size s); it must only do graph-safe work (no host
    syncs, no Python branching on tensor values). Static input buffers hold the largest size;
    the graph of size s reads their first s (+ k) rows, so all graphs share them. An input may
    be narrower than its buffer past dim 0 (a block table of fewer columns): it fills the
    leading corner, and `fn` must not read past what the rows' own lengths cover.

    Without CUDA (or before `capture`), `run` calls `fn` eagerly on the same padded buffers,
    which keeps the padding semantics testable anywhere.
    """

    def __init__(
        self,
        fn: Callable[..., Outputs],
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
        self.outputs: dict[int, Outputs] = {}
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
            if (
                src.shape[0] != n + k
                or src.dim() != dst.dim()
                or any(a > b for a, b in zip(src.shape[1:], dst.shape[1:], strict=True))
            ):
                raise ValueError(f"input {tuple(src.shape)} does not fit buffer {tuple(dst.shape)}")
            corner = (slice(0, n + k), *(slice(0, d) for d in src.shape[1:]))
            dst[corner].copy_(src, non_blocking=True)
            if size > n:
                dst[n + k : size + k].fill_(pad)
        return n, size

    def run(self, *inputs: torch.Tensor) -> Outputs:
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
        return _head(out, n)


def _decode_forward(
    model: torch.nn.Module,
    backend: AttentionBackend,
    max_seq_len: int,
    is_last: bool,
    max_size: int,
    device: torch.device,
) -> Callable[..., Outputs]:
    """The captured function: a decode-only forward over fixed-shape metadata.

    A closure rather than a method, so the graph runner holding it does not hold its owner
    (no reference cycle keeps a dropped set of graphs, and their memory pool, alive).
    """
    query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)

    def forward(
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *hidden: torch.Tensor,
    ) -> Outputs:
        n = input_ids.shape[0]
        meta = AttentionMetadata(
            n,
            slot_mapping,
            seq_lens=seq_lens,
            query_start_loc=query_start_loc[: n + 1],
            block_tables=block_tables,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )
        intermediate = IntermediateTensors(*hidden) if hidden else None
        with forward_context(backend, meta):
            out = model(input_ids, positions, intermediate)
        return out if is_last else (out.hidden_states, out.residual)

    return forward


class DecodeGraphs:
    """Decode-only steps of a model slice through a `CudaGraphRunner`.

    The graph covers embedding (or the previous stage's tensors) to the final hidden states
    (or the tensors for the next stage); logits and sampling stay outside, on the rows the
    runner selects. Attention metadata is fixed-shape: query_start_loc is 0..B, max_seq_len the
    capture cap, and the block tables are max_seq_len / block_size wide.

    Args:
        model: the model slice; `backend`: its attention backend (graph-safe: triton).
        sizes: batch sizes to capture (see `capture_sizes`).
        max_seq_len: longest context a graph covers (see `should_run_eager`).
        hidden_size, dtype: of the activations passed between pipeline stages.
        is_first, is_last: this rank's place in the pipeline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        sizes: Sequence[int],
        *,
        max_seq_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        is_first: bool,
        is_last: bool,
    ) -> None:
        self.sizes = sorted(set(sizes))
        self.max_seq_len = max_seq_len
        self.is_last = is_last
        m = self.sizes[-1]
        width = -(-max_seq_len // block_size)
        examples = [
            torch.zeros(m, dtype=torch.int64, device=device),  # input ids
            torch.zeros(m, dtype=torch.int64, device=device),  # positions
            torch.full((m,), -1, dtype=torch.int64, device=device),  # cache slots
            torch.zeros(m, width, dtype=torch.int32, device=device),  # block tables
            torch.zeros(m, dtype=torch.int32, device=device),  # seq lens
        ]
        pads = [0, 0, -1, 0, 0]
        if not is_first:
            # the previous stage's hidden states and residual
            examples += [torch.zeros(m, hidden_size, dtype=dtype, device=device) for _ in range(2)]
            pads += [0, 0]
        forward = _decode_forward(model, backend, max_seq_len, is_last, m, device)
        self.runner = CudaGraphRunner(forward, examples, self.sizes, pad_values=pads)

    def can_run(self, num_seqs: int, max_query_len: int, max_seq_len: int) -> bool:
        """Whether a step replays a graph: decodes only, and within the captured sizes."""
        return max_query_len == 1 and not should_run_eager(
            num_seqs, max_seq_len, self.sizes, self.max_seq_len, enforce_eager=False
        )

    def capture(self) -> None:
        """Capture every size (CUDA only)."""
        self.runner.capture()

    def run(
        self,
        attn: AttentionMetadata,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """The model's output for a decode-only step (see `can_run`), through the graph of
        the padded batch size: hidden states [n, H] on the last rank, else the
        IntermediateTensors for the next one (copied out of the graph's static buffers)."""
        inputs = [input_ids, positions, attn.slot_mapping, attn.block_tables, attn.seq_lens]
        if intermediate is not None:
            inputs += [intermediate.hidden_states, intermediate.residual]
        out = self.runner.run(*inputs)
        if self.is_last:
            return out
        hidden, residual = out
        return IntermediateTensors(hidden.clone(), residual.clone())


def measure_capture_memory(graphs: DecodeGraphs, device: torch.device) -> int:
    """Device bytes a capture of `graphs` keeps reserved (its memory pool and static buffers):
    the growth of reserved memory across the capture, with the allocator's free cache (the
    side-stream warm-up's) released on both ends. CUDA only."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    graphs.capture()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return max(0, torch.cuda.memory_reserved(device) - before)
