"""Pipeline stage transfer: hidden states and residual from rank to rank over torch.distributed.

The ranks form one process group (gloo on CPU, NCCL on CUDA) that they join themselves from
`WorkerConfig.init_method()`, through a store bound to the master address (`rendezvous.py`). Every step the scheduler sends to all ranks; each rank but the
first receives the previous rank's activations for it, and each rank but the last sends its
own to the next. A step crosses as two point-to-point messages: a header
[step_id, num_tokens, layout] and, when num_tokens > 0, one tensor [2, num_tokens, hidden]
holding hidden states and residual. The header lets the receiver check that both ranks run
the same step over the same rows in the same order (`pipeline.step_layout`), so a
disagreement fails loudly instead of mixing requests.

Sends are asynchronous (a send completes only once the receiver posts the matching receive,
so a blocking send would hold rank 0 until the next stage is free: no overlap). Every wait
is bounded by `distributed_timeout_seconds`; a dead peer is noticed sooner, when gloo sees its
connection close. Any failure raises `StageTransferError`, which kills this rank's engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.common import messages as msg
from splitserve.protos import worker_pb2
from splitserve.worker import parallel_state
from splitserve.worker.config import WorkerConfig
from splitserve.worker.pipeline import IntermediateTensors
from splitserve.worker.rendezvous import Rendezvous

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 600.0
"""Longest wait for every rank to join the group: peers load their weights at their own pace."""
MAX_PENDING_SENDS = 8
"""Sends not yet taken by the next rank before this rank waits for the oldest."""


def _indexed(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:N` of the current device (NCCL binds the group to one device)."""
    if device.index is not None:
        return device
    return torch.device(device.type, torch.cuda.current_device())


class StageTransferError(RuntimeError):
    """A peer rank died, timed out, or ran a different step: the pipeline cannot go on."""


class StageLink:
    """This rank's ends of the pipeline: receive from rank - 1, send to rank + 1.

    With tensor parallelism (T ranks per stage) the world holds P x T processes, global rank
    pp_rank * T + tp_rank; each tensor-parallel rank exchanges activations with the same
    tensor-parallel rank of the neighbouring stages (activations are whole on every rank),
    and the stage's ranks also form a group of their own (`parallel_state.set_tp_group`).
    """

    def __init__(self, config: WorkerConfig, device: torch.device) -> None:
        tp = config.tensor_parallel_size
        self.rank = config.rank * tp + config.tp_rank
        """This process's global rank (the pipeline rank when T = 1)."""
        self.stride = tp
        """Global-rank distance to the same tensor-parallel rank of the next stage."""
        self.world_size = config.pipeline_parallel_size * tp
        self.device = device
        self.timeout = timedelta(seconds=config.distributed_timeout_seconds)
        self.is_first = config.is_first_rank
        self.is_last = config.is_last_rank
        self._pending: deque[tuple[object, torch.Tensor, float]] = deque()
        """(work, tensor, monotonic time sent) of sends the next rank has not taken yet."""
        self._rendezvous: Rendezvous | None = None
        backend = "nccl" if device.type == "cuda" else "gloo"
        self._sends_report_completion = backend == "nccl"
        """NCCL's `is_completed` tells a taken send; gloo's stays False until a wait."""
        init_method = config.init_method()
        logger.info(
            "rank %d of %d joining the %s pipeline group at %s",
            self.rank,
            self.world_size,
            backend,
            init_method,
        )
        try:
            join_timeout = timedelta(seconds=max(JOIN_TIMEOUT_S, self.timeout.total_seconds()))
            # NOTE: held for the life of the group: on rank 0 it owns the store's socket.
            self._rendezvous = Rendezvous(init_method, self.rank, self.world_size, join_timeout)
            dist.init_process_group(
                backend,
                **self._rendezvous.join_kwargs(),
                rank=self.rank,
                world_size=self.world_size,
                timeout=join_timeout,
                **({"device_id": _indexed(device)} if device.type == "cuda" else {}),
            )
            if tp > 1:
                self._join_tensor_parallel_group(config)
        except Exception as exc:
            raise StageTransferError(
                f"rank {self.rank} could not join the pipeline group at {init_method}: {exc}"
            ) from exc

    def _join_tensor_parallel_group(self, config: WorkerConfig) -> None:
        """Make every stage's group (each process makes all of them, in the same order) and
        record this stage's."""
        tp = config.tensor_parallel_size
        timeout = timedelta(seconds=config.distributed_timeout_seconds)
        for stage in range(config.pipeline_parallel_size):
            ranks = list(range(stage * tp, (stage + 1) * tp))
            group = dist.new_group(ranks, timeout=timeout)
            if stage == config.rank:
                parallel_state.set_tp_group(group, ranks[0])

    # ------------------------------------------------------------------ send side
    def send(self, step_id: int, tensors: IntermediateTensors, layout: int) -> float:
        """Hand a step's activations to the next rank; returns seconds spent waiting for
        earlier sends (only when too many are still pending)."""
        hidden, residual = tensors.hidden_states, tensors.residual
        n = int(hidden.shape[0])
        header = torch.tensor([step_id, n, layout], dtype=torch.int64, device=self.device)
        self._isend(header)
        if n:
            self._isend(torch.stack([hidden, residual]).contiguous())
        waited = 0.0
        # NOTE: on gloo `is_completed` stays False until a send is waited on (see
        # `check_sends`), so there the window is simply the last MAX_PENDING_SENDS sends.
        while self._pending and (
            len(self._pending) > MAX_PENDING_SENDS or self._pending[0][0].is_completed()
        ):
            start = time.perf_counter()
            self._wait(self._pending.popleft()[0], "send to", self.rank + self.stride)
            waited += time.perf_counter() - start
        return waited

    def _isend(self, tensor: torch.Tensor) -> None:
        try:
            work = dist.isend(tensor, self.rank + self.stride)
        except Exception as exc:
            raise StageTransferError(
                f"rank {self.rank} could not send to rank {self.rank + self.stride}: {exc}"
            ) from exc
        # NOTE: the tensor must stay alive until the send completes.
        self._pending.append((work, tensor, time.monotonic()))

    def check_sends(self) -> None:
        """Wait for the sends the next rank has not been seen to take, each for what is left
        of its timeout, and raise if one is still untaken then (the next rank hangs). Called
        while this rank waits for steps, when nothing else would notice.

        A gloo send reads as not completed until it is waited on, whether or not the next
        rank took it, so polling `is_completed` cannot tell a taken send from a stuck peer
        (the last sends of every burst looked untaken forever, and an idle pipeline failed
        once they were older than the timeout). Nor can a short `wait` poll: a gloo wait that
        times out closes the connection. A taken send's wait returns at once. NCCL's
        `is_completed` does tell, so there the oldest untaken send's age decides.
        """
        limit = self.timeout.total_seconds()
        while self._pending:
            work, _, sent = self._pending[0]
            age = time.monotonic() - sent
            if work.is_completed():
                self._wait(work, "send to", self.rank + self.stride)
                self._pending.popleft()
                continue
            if self._sends_report_completion:
                if age > limit:
                    raise self._untaken(sent)
                return
            try:
                # NOTE: an overdue send still gets a moment: it may have been taken long ago.
                work.wait(timedelta(seconds=max(limit - age, 0.05)))
            except Exception as exc:
                raise self._untaken(sent, exc) from exc
            self._pending.popleft()

    def _untaken(self, sent: float, cause: Exception | None = None) -> StageTransferError:
        limit = self.timeout.total_seconds()
        return StageTransferError(
            f"pipeline rank {self.rank + self.stride} has not taken rank {self.rank}'s activations for "
            f"{time.monotonic() - sent:.0f}s (timeout {limit:.0f}s): it is stuck"
            + (f" ({cause})" if cause is not None else "")
        )

    # ------------------------------------------------------------------ receive side
    def recv(self, step_id: int, hidden_size: int, dtype: torch.dtype) -> IntermediateTensors:
        """The previous rank's activations for step `step_id` (possibly zero tokens)."""
        header = torch.empty(3, dtype=torch.int64, device=self.device)
        self._wait(
            dist.irecv(header, self.rank - self.stride), "receive from", self.rank - self.stride
        )
        got_step, n, layout = (int(x) for x in header.tolist())
        if got_step != step_id:
            raise StageTransferError(
                f"rank {self.rank} runs step {step_id} but rank {self.rank - self.stride} sent step "
                f"{got_step}: the ranks disagree on the step order"
            )
        payload = torch.empty(2, n, hidden_size, dtype=dtype, device=self.device)
        if n:
            self._wait(
                dist.irecv(payload, self.rank - self.stride),
                "receive from",
                self.rank - self.stride,
            )
        return IntermediateTensors(payload[0], payload[1], layout)

    def _wait(self, work, verb: str, peer: int) -> None:
        try:
            work.wait(self.timeout)
        except Exception as exc:
            raise StageTransferError(
                f"pipeline rank {self.rank} could not {verb} rank {peer} "
                f"(timeout {self.timeout.total_seconds():.0f}s): {exc}"
            ) from exc

    def close(self) -> None:
        """Leave the group (pending sends are dropped: the peers are stopping too)."""
        self._pending.clear()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer can make teardown fail; the process is exiting
                logger.warning("leaving the pipeline group failed", exc_info=True)
        if self._rendezvous is not None:
            self._rendezvous.close()


class PipelineStage:
    """Runs one rank's part of each step (receive, compute, send) and accounts its time.

    Only the step thread calls `execute`; `stats` may be read from any thread.
    """

    def __init__(self, runner, link: StageLink | None, channel=None) -> None:
        self.runner = runner
        self.link = link
        self.channel = channel
        """The driver's `tp_channel.StageChannel` to its tensor-parallel peers, or None."""
        self._lock = threading.Lock()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.num_steps = 0
        self.compute = self.recv_wait = self.send_wait = self.step_wait = 0.0
        self._first_start: float | None = None
        self._last_end: float | None = None

    def execute(self, step: msg.StepRequest, message=None) -> msg.StepResult:
        """Run `step` on this rank; non-last ranks answer with the step id only. `message`:
        the StepRequest protobuf `step` came from, which a driver forwards to its peers as it
        is (rebuilt from `step` when not given)."""
        start = time.perf_counter()
        recv_wait = send_wait = 0.0
        runner, link = self.runner, self.link
        if self.channel is not None:
            from splitserve.common.messages_proto import step_request_to_proto
            from splitserve.worker.tp_channel import Command

            if message is None:
                message = step_request_to_proto(step)
            self.channel.send(Command.STEP, message.SerializeToString())
        intermediate = None
        if link is not None and not link.is_first:
            intermediate = link.recv(
                step.step_id, runner.loaded.hf_config.hidden_size, runner.dtype
            )
            recv_wait = time.perf_counter() - start
        out = runner.execute(step, intermediate)
        if link is not None and not link.is_last:
            send_wait = link.send(step.step_id, out, runner.last_layout)
            out = msg.StepResult(step_id=step.step_id)
        end = time.perf_counter()
        with self._lock:
            if self._first_start is None:
                self._first_start = start
            elif self._last_end is not None:
                self.step_wait += start - self._last_end
            self._last_end = end
            self.num_steps += 1
            self.recv_wait += recv_wait
            self.send_wait += send_wait
            self.compute += end - start - recv_wait - send_wait
        return out

    def describe(self, block_size: int, engine=None) -> worker_pb2.DescribeResponse:
        """The runner's describe; a driver runs it on every rank of its stage and reports the
        least KV memory any of them can give."""
        if self.channel is None:
            return self.runner.describe(block_size, engine)
        from splitserve.worker.tp_channel import Command, describe_payload

        self.channel.send(Command.DESCRIBE, describe_payload(block_size, engine))
        try:
            answer = self.runner.describe(block_size, engine)
        except Exception:
            self.channel.min_over_stage(-1)
            raise
        least = self.channel.min_over_stage(answer.available_kv_bytes)
        if least < 0:
            raise ValueError(
                "a tensor-parallel rank of this stage refused to describe itself (its log has "
                "the reason)"
            )
        answer.available_kv_bytes = least
        return answer

    def initialize_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0):
        """The runner's initialize_cache, on every rank of the stage."""
        if self.channel is not None:
            from splitserve.worker.tp_channel import Command

            request = worker_pb2.InitializeCacheRequest(
                num_blocks=num_blocks, block_size=block_size, num_state_slots=num_state_slots
            )
            self.channel.send(Command.INITIALIZE_CACHE, request.SerializeToString())
        return self.runner.initialize_cache(num_blocks, block_size, num_state_slots)

    def heartbeat(self) -> None:
        """A driver with nothing to send tells its peers it is alive."""
        if self.channel is not None and self.channel.heartbeat_due():
            from splitserve.worker.tp_channel import Command

            self.channel.send(Command.HEARTBEAT)

    def stop_peers(self) -> None:
        """Tell the peers the driver is stopping."""
        if self.channel is not None:
            from splitserve.worker.tp_channel import Command

            self.channel.send(Command.STOP)

    @property
    def watch_interval(self) -> float | None:
        """Seconds between `check` calls while idle; None when there is nothing to watch."""
        if self.link is None or self.link.is_last:
            return None
        return max(0.5, min(5.0, self.link.timeout.total_seconds() / 4))

    def check(self) -> None:
        """Between steps: fail if the next rank stopped taking this rank's activations."""
        if self.link is not None and not self.link.is_last:
            self.link.check_sends()

    def stats(self, reset: bool = False) -> worker_pb2.StageStats:
        """The counters (and zero them when `reset`)."""
        with self._lock:
            wall = (
                self._last_end - self._first_start
                if self._first_start is not None and self._last_end is not None
                else 0.0
            )
            out = worker_pb2.StageStats(
                rank=self.runner.config.rank,
                num_steps=self.num_steps,
                compute_seconds=self.compute,
                recv_wait_seconds=self.recv_wait,
                send_wait_seconds=self.send_wait,
                step_wait_seconds=self.step_wait,
                wall_seconds=wall,
            )
            if reset:
                self._reset_counters()
        return out
