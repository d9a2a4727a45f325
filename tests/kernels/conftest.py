"""Kernel tests run the Triton kernels in the interpreter on CPU.

TRITON_INTERPRET must be set before anything imports triton, hence at conftest import time.
On a GPU box, run `TRITON_INTERPRET=0 pytest tests/kernels` to test the compiled kernels on
CUDA tensors instead (the helpers pick the device from the same variable).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A new seed per test, printed so a failure can be replayed with KERNEL_TEST_SEED=<n>."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"KERNEL_TEST_SEED={seed}")
    return seed
