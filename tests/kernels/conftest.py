"""Kernel tests: Triton kernels against their torch references.

Without CUDA the kernels run in the Triton interpreter on CPU tensors. TRITON_INTERPRET must be
set before any kernel module is decorated (i.e. imported), hence here, at conftest import.
On a CUDA host it is left unset so the same tests run the compiled kernels on the GPU (and the
bf16 tests, which the interpreter cannot do, run too); TRITON_INTERPRET=1 forces the
interpreter there as well. `import torch` does not import triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test, printed so a failure can be replayed with KERNEL_TEST_SEED=<n>."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"KERNEL_TEST_SEED={seed}")
    return seed
