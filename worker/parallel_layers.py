"""Tensor-parallel layers that are not a fused column projection (those are `linear.QKVLinear`
and `linear.GateUpLinear`, which slice their output rows by themselves).

- `RowParallelLinear` (o_proj, down_proj): each rank holds the input columns its column-parallel
  predecessor produced, computes a partial product, and the stage sums them (all-reduce); only
  the driver holds the bias (the others a zero one), so the sum adds it once.
- `VocabParallelEmbedding` and `ParallelLMHead`: the vocabulary is cut into equal chunks of
  ceil(V / T) rows (the last one zero-padded); a rank embeds the ids in its chunk and the stage
  sums, and the lm_head's logits chunks are gathered on the stage's driver, which samples.

The factories return the plain single-rank module when the model is built for one rank, so a
model at TP = 1 is exactly what it was.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.worker import parallel_state
from splitserve.worker.checkpoint_slices import reads_slices, whole
from splitserve.worker.linear import Linear, default_weight_loader, set_weight_attrs


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r @ W_r.T, + b: W's input columns split over the stage."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        state = parallel_state.current()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.tp_sharded = True
        local = parallel_state.shard_size(in_features, self.tp_size, "the input features")
        super().__init__(local, out_features, bias=bias)

    @reads_slices
    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        """This rank's input columns of a tensor that runs over the inputs (its `input_dim`,
        in whole `col_block`-column blocks); the bias on the driver only; anything else (a
        per-channel or per-tensor scale, a static input scale) whole."""
        dim = getattr(param, "input_dim", None)
        if dim is not None:
            loaded = loaded.narrow(dim, *self.input_slice(param))
        elif param is self.bias and self.tp_rank != 0:
            # NOTE: only the driver adds the bias: the sum over ranks then holds it once.
            loaded = torch.zeros(loaded.shape)
        else:
            loaded = whole(loaded)
        default_weight_loader(param, loaded, shard_id)

    def input_slice(self, param: torch.Tensor) -> tuple[int, int]:
        """(first, count) of this rank's entries along `param`'s input axis: its input
        columns, counted in blocks of `col_block`; ValueError unless they are whole blocks."""
        block = getattr(param, "col_block", 1)
        if self.in_features % block:
            raise ValueError(
                f"tensor parallelism gives each of {self.tp_size} ranks "
                f"{self.in_features} input columns of {self.tp_size * self.in_features}, not a "
                f"whole number of the {block}-column blocks of its scales; use a "
                "--tensor-parallel-size that splits the input features into whole blocks"
            )
        count = self.in_features // block
        return self.tp_rank * count, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_state.tp_all_reduce(self.method.apply(self, x), self.tp_size)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    """A `RowParallelLinear` under tensor parallelism, else a plain `Linear`."""
    if parallel_state.current().tp_size == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias)


def vocab_chunk(vocab_size: int, tp_size: int) -> int:
    """Rows of the vocabulary each rank holds (the last chunk zero-padded)."""
    return -(-vocab_size // tp_size)


def _vocab_loader(module: nn.Module, vocab_size: int):
    rank, chunk = module.tp_rank, module.chunk

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"is one shard ({shard_id!r}) of a parameter that has no shards")
        if loaded.shape[0] != vocab_size:
            raise ValueError(
                f"has shape {tuple(loaded.shape)}, the model expects ({vocab_size}, "
                f"{param.shape[1]})"
            )
        start = rank * chunk
        rows = max(0, min(chunk, vocab_size - start))
        with torch.no_grad():
            param.zero_()
            param[:rows].copy_(loaded[start : start + rows])

    return reads_slices(load)


class VocabParallelEmbedding(nn.Module):
    """The token embedding with the vocabulary split over the stage's ranks."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        state = parallel_state.current()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.num_embeddings, self.embedding_dim = vocab_size, hidden_size
        self.chunk = vocab_chunk(vocab_size, self.tp_size)
        self.weight = nn.Parameter(torch.empty(self.chunk, hidden_size), requires_grad=False)
        set_weight_attrs(self, "weight", weight_loader=_vocab_loader(self, vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.tp_rank * self.chunk
        inside = (local >= 0) & (local < self.chunk)
        out = nn.functional.embedding(local.clamp(0, self.chunk - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return parallel_state.tp_all_reduce(out, self.tp_size)


def vocab_embedding(vocab_size: int, hidden_size: int) -> nn.Module:
    """A `VocabParallelEmbedding` under tensor parallelism, else `nn.Embedding`."""
    if parallel_state.current().tp_size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size)


class ParallelLMHead(Linear):
    """lm_head over this rank's vocabulary chunk; `gather` puts the full logits on the driver."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        state = parallel_state.current()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.tp_sharded = True
        self.chunk = vocab_chunk(vocab_size, self.tp_size)
        self.vocab_size = vocab_size
        super().__init__(hidden_size, self.chunk, bias=False)
        set_weight_attrs(self, "weight", weight_loader=_vocab_loader(self, vocab_size))

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor | None:
        """[N, chunk] on every rank -> [N, vocab] on the driver, None elsewhere."""
        full = parallel_state.tp_gather_to_driver(local_logits, self.tp_size)
        return None if full is None else full[:, : self.vocab_size]


def lm_head(hidden_size: int, vocab_size: int) -> Linear:
    """A `ParallelLMHead` under tensor parallelism, else a plain `Linear`."""
    if parallel_state.current().tp_size == 1:
        return Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size)
