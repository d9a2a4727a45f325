"""Drive a real EngineCore over the fake worker, step by step."""

from __future__ import annotations

import hashlib
import struct

from splitserve.common import messages as msg
from splitserve.protos import common_pb2, scheduler_pb2
from splitserve.scheduler.config import SchedulerConfig
from splitserve.scheduler.engine_core import EngineCore

from .fake_worker import FakeWorkerExecutor


def make_engine(
    num_blocks: int = 64,
    block_size: int = 4,
    vocab_size: int = 1000,
    eos: tuple[int, ...] = (),
    max_model_len: int = 4096,
    **cfg,
) -> tuple[EngineCore, FakeWorkerExecutor]:
    ex = FakeWorkerExecutor(num_blocks, vocab_size, max_model_len, eos)
    config = SchedulerConfig(block_size=block_size, **cfg)
    return EngineCore(config, ex), ex


def gen_request(rid: str, prompt: list[int], max_tokens: int = 8, **sp) -> msg.GenerateRequest:
    """The engine's form, for calls into the scheduler itself."""
    params = msg.SamplingParams(max_tokens=max_tokens, **sp)
    return msg.GenerateRequest(
        request_id=rid, prompt_token_ids=list(prompt), sampling_params=params
    )


def gen_request_proto(
    rid: str, prompt: list[int], max_tokens: int = 8, **sp
) -> scheduler_pb2.GenerateRequest:
    """The wire form, for calls to the scheduler's gRPC service."""
    params = common_pb2.SamplingParams(max_tokens=max_tokens, **sp)
    return scheduler_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling_params=params
    )


def run_to_completion(
    engine: EngineCore, max_steps: int = 10_000, on_step=None
) -> dict[str, tuple[list[int], int]]:
    """Run until idle; returns request id -> (output token ids, finish reason)."""
    outs: dict[str, list[int]] = {}
    reasons: dict[str, int] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        if on_step:
            on_step(engine)
    else:
        raise AssertionError("engine did not go idle")
    return {rid: (toks, reasons.get(rid, 0)) for rid, toks in outs.items()}


def prompts(n: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def block_key_chain(
    tokens: list[int], block_size: int, salt: bytes = b"", extra_key: bytes = b""
) -> list[bytes]:
    """The documented prefix-cache key of each full block, computed independently of the
    scheduler: SHA-256(parent || [len(extra) || extra] || [int32 -1 || len(salt) || salt, first
    block only] || int32 LE token ids), starting from SHA-256(b"splitserve-prefix-cache-v1")."""
    parent = hashlib.sha256(b"splitserve-prefix-cache-v1").digest()
    keys = []
    for i in range(len(tokens) // block_size):
        data = parent
        if extra_key:
            data += struct.pack("<I", len(extra_key)) + extra_key
        if salt and i == 0:
            data += struct.pack("<iI", -1, len(salt)) + salt
        data += struct.pack(f"<{block_size}i", *tokens[i * block_size : (i + 1) * block_size])
        parent = hashlib.sha256(data).digest()
        keys.append(parent)
    return keys


def cached_keys(engine) -> dict[bytes, int]:
    """Prefix-cache key -> block id, as the pool holds them."""
    pool = engine.scheduler.kv.pool
    for key, block in pool._cached.items():
        assert block.block_hash == key
    return {key: block.block_id for key, block in pool._cached.items()}
