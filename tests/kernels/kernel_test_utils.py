"""Shared helpers for the kernel tests: device choice, tolerances, paged-batch builder."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Compiled kernels need CUDA; in the interpreter everything runs on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")

requires_compiled_gpu = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="needs CUDA and compiled Triton (the interpreter gets bf16 wrong)"
)

# Interpreter-testable dtypes; bf16 arithmetic is wrong in the interpreter, so GPU only.
DTYPES = [torch.float32, torch.float16]

# (atol, rtol) for elementwise kernels: one fp32 computation, one rounding at the store.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# (atol, rtol) for attention: probabilities are rounded to the cache dtype before P @ V, as in
# every flash kernel, and online softmax reorders the sums.
ATTN_TOL = {
    torch.float32: (3e-5, 3e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


# (atol, rtol) for the fused MoE: two GEMMs and an activation, each output rounded to the
# model dtype (where the reference rounds too, but a 1-ulp difference feeds the next GEMM).
# Worst seen over 40 seeds (33 tokens, H 40, I 36): 1.0e-2 in fp16, 7.4e-2 in bf16.
MOE_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1.2e-1, 1.2e-1),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    """torch.testing.assert_close with the named tolerance of expected's dtype."""
    atol, rtol = tol[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PagedBatch:
    """A ragged batch written into a paged cache, plus the dense per-sequence K/V it came from."""

    q: torch.Tensor  # [T, Hq, D]
    key_cache: torch.Tensor  # [NB, BS, Hk, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, MB]
    seq_lens: torch.Tensor  # int32 [S]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    keys: list[torch.Tensor]  # per sequence [seq_len, Hk, D]
    values: list[torch.Tensor]
    query_lens: list[int]

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def attention_args(self) -> tuple:
        return (
            self.q, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
            self.cu_seqlens_q,
        )  # fmt: skip


def make_paged_batch(
    specs: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    shared_prefix_blocks: int = 0,
    pad_value: int = -1,
    poison: bool = True,
    q_scale: float = 1.0,
) -> PagedBatch:
    """Build a paged batch from (query_len, context_len) per sequence.

    Block ids are a random permutation with a few never-used ids mixed in (holes); padding
    entries of the block table hold `pad_value`. With `shared_prefix_blocks` = n, sequences 0
    and 1 point at the SAME first n physical blocks and hold the same first n*BS tokens. With
    `poison`, every cache slot that no live token owns is NaN, so reading it anywhere shows up.
    """
    seq_lens = [q + c for q, c in specs]
    nblocks = [cdiv(n, block_size) for n in seq_lens]
    if shared_prefix_blocks:
        for i in (0, 1):
            assert specs[i][1] >= shared_prefix_blocks * block_size, "share only cached blocks"
    total = sum(nblocks) - shared_prefix_blocks
    num_cache_blocks = total + 3  # holes
    ids = torch.randperm(num_cache_blocks).tolist()
    tables = torch.full((len(specs), max(nblocks) + 1), pad_value, dtype=torch.int32)
    for i, n in enumerate(nblocks):
        start = 0
        if i == 1 and shared_prefix_blocks:
            tables[1, :shared_prefix_blocks] = tables[0, :shared_prefix_blocks]
            start = shared_prefix_blocks
        for b in range(start, n):
            tables[i, b] = ids.pop()

    fill = float("nan") if poison else 0.0
    shape = (num_cache_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, fill, dtype=dtype)
    value_cache = torch.full(shape, fill, dtype=dtype)
    keys, values = [], []
    for i, n in enumerate(seq_lens):
        k = torch.randn(n, num_kv_heads, head_dim).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim).to(dtype)
        if i == 1 and shared_prefix_blocks:
            shared = shared_prefix_blocks * block_size
            k[:shared], v[:shared] = keys[0][:shared], values[0][:shared]
        t = torch.arange(n)
        blocks, offsets = tables[i, t // block_size].long(), t % block_size
        key_cache[blocks, offsets] = k
        value_cache[blocks, offsets] = v
        keys.append(k)
        values.append(v)

    query_lens = [q for q, _ in specs]
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = (torch.randn(int(cu[-1]), num_heads, head_dim) * q_scale).to(dtype)
    return PagedBatch(
        q=q.to(DEVICE),
        key_cache=key_cache.to(DEVICE),
        value_cache=value_cache.to(DEVICE),
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens_q=cu.to(DEVICE),
        keys=keys,
        values=values,
        query_lens=query_lens,
    )
