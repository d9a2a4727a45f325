"""How a stage's driver hands its work to the stage's other tensor-parallel ranks.

Only the driver (tensor-parallel rank 0) talks gRPC to the scheduler. Whatever it is asked to
do that involves the model (describe with a memory profile, initialize the cache, run a step)
it first broadcasts over the stage's torch.distributed group, so every rank runs the same call
in the same order and meets the driver in the same collectives. A command crosses as two
broadcasts: a header [command, payload bytes] and, when there is a payload, the serialized
protobuf request as a uint8 tensor (protobuf, never pickle). While idle the driver sends a
heartbeat every `interval` seconds, so a peer that hears nothing for the distributed timeout
knows its driver is gone (and exits), instead of waiting forever.

Within a step, what only the last stage's driver decides (the requests its grammar matchers
refuse, the tokens it samples, the rows it defers) reaches its peers the same way
(`share_refusals`, `share_samples`), so every rank keeps the same request state.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.protos import worker_pb2
from splitserve.worker import parallel_state

logger = logging.getLogger(__name__)


class Command(enum.IntEnum):
    STEP = 1
    DESCRIBE = 2
    INITIALIZE_CACHE = 3
    HEARTBEAT = 4
    STOP = 5


class TensorParallelError(RuntimeError):
    """The stage's driver or a peer died, stalled or refused: the stage cannot go on."""


class StageChannel:
    """One end of the driver -> peers command broadcast of this stage."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.group = parallel_state.tp_group()
        self.driver = parallel_state.tp_driver_rank()
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.interval = max(0.5, min(5.0, timeout_s / 4))
        """Seconds between the driver's heartbeats while idle."""
        self.last_sent = time.monotonic()

    # ------------------------------------------------------------------ driver side
    def send(self, command: Command, payload: bytes = b"") -> None:
        """Broadcast `command` (and its payload) to the stage's peers."""
        header = torch.tensor([int(command), len(payload)], dtype=torch.int64, device=self.device)
        self._broadcast(header, "send a command to")
        if payload:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
            self._broadcast(data, "send a command to")
        self.last_sent = time.monotonic()

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_sent >= self.interval

    # ------------------------------------------------------------------ peer side
    def receive(self) -> tuple[Command, bytes]:
        """The driver's next command; TensorParallelError when none comes within the timeout
        (heartbeats included) or the driver's connection closed."""
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._broadcast(header, "hear from")
        command, size = (int(x) for x in header.tolist())
        payload = b""
        if size:
            data = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._broadcast(data, "hear from")
            payload = data.cpu().numpy().tobytes()
        return Command(command), payload

    # ------------------------------------------------------------------ both
    def min_over_stage(self, value: int) -> int:
        """The least `value` over the stage's ranks (every rank calls it)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group, async_op=True).wait(
                self.timeout
            )
        except Exception as exc:
            raise TensorParallelError(f"the stage's ranks could not agree: {exc}") from exc
        return int(t.item())

    def _broadcast(self, tensor: torch.Tensor, verb: str) -> None:
        try:
            work = dist.broadcast(tensor, self.driver, group=self.group, async_op=True)
            work.wait(self.timeout)
        except Exception as exc:
            raise TensorParallelError(
                f"tensor-parallel rank {dist.get_rank()} could not {verb} its stage "
                f"(driver rank {self.driver}, timeout {self.timeout.total_seconds():.0f}s): {exc}"
            ) from exc


def describe_payload(block_size: int, engine) -> bytes:
    request = worker_pb2.DescribeRequest(block_size=block_size)
    if engine is not None:
        request.engine.CopyFrom(engine)
    return request.SerializeToString()


def serve_peer(runner, stage, channel: StageChannel, stopping: threading.Event) -> None:
    """A peer's whole life after loading: run the driver's commands until STOP, or until
    `stopping` is set (checked between commands: at the latest one heartbeat later); raises
    TensorParallelError when the driver is gone."""
    from splitserve.common.messages_proto import step_request_from_proto

    while not stopping.is_set():
        command, payload = channel.receive()
        if command is Command.STEP:
            step = step_request_from_proto(worker_pb2.StepRequest.FromString(payload))
            stage.execute(step)
        elif command is Command.DESCRIBE:
            request = worker_pb2.DescribeRequest.FromString(payload)
            engine = request.engine if request.HasField("engine") else None
            try:
                available = runner.describe(request.block_size, engine).available_kv_bytes
            except Exception:
                logger.exception("describe failed on this tensor-parallel rank")
                available = -1
            channel.min_over_stage(available)
        elif command is Command.INITIALIZE_CACHE:
            request = worker_pb2.InitializeCacheRequest.FromString(payload)
            runner.initialize_cache(request.num_blocks, request.block_size, request.num_state_slots)
        elif command is Command.STOP:
            logger.info("the stage's driver stopped; stopping")
            return


def share_refusals(runner, errors: dict[str, str]) -> None:
    """The last stage's driver alone holds grammar matchers, so only it can refuse a new
    request's constraint: it tells its peers which requests it dropped, and they drop
    them too, so that every rank plans the same rows. Every rank of the last stage calls it
    after applying the step's request changes."""
    payload = "\n".join(errors).encode() if runner.samples else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=runner.device)
    size = int(parallel_state.tp_broadcast_from_driver(size).item())
    if size == 0:
        return
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
    if data is None:
        data = torch.empty(size, dtype=torch.uint8)
    data = parallel_state.tp_broadcast_from_driver(data.to(runner.device)).cpu()
    if runner.samples:
        return
    for rid in data.numpy().tobytes().decode().split("\n"):
        runner.states.forget(rid)


def share_samples(runner, plan, result) -> None:
    """The last stage's driver hands the tokens it sampled (and the rows it deferred) to
    its tensor-parallel peers, which append them as it did (`result`, the driver's
    StepResult, is None on a peer). Every rank of the last stage calls it after the logits."""
    batch = runner.batch
    rows = plan.sample_rows
    tokens = torch.full((rows.size,), -1, dtype=torch.int64)
    if result is not None:
        sampled = dict(zip(result.request_ids, result.token_ids, strict=True))
        tokens = torch.tensor(
            [sampled.get(batch.req_ids[r], -1) for r in rows.tolist()], dtype=torch.int64
        )
    tokens = parallel_state.tp_broadcast_from_driver(tokens.to(runner.device)).cpu().numpy()
    if result is not None:
        return
    took = tokens >= 0
    if (~took).any():  # deferred at the driver: computed again later
        batch.num_computed[rows[~took]] -= 1
        runner.deferred_ids.update(batch.req_ids[r] for r in rows[~took].tolist())
    rows = rows[took]
    runner.deferred_ids.difference_update(batch.req_ids[r] for r in rows.tolist())
    lengths = batch.num_tokens[rows]
    batch.token_ids[rows, lengths] = tokens[took]
    batch.num_tokens[rows] = lengths + 1
