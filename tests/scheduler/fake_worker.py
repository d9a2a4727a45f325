"""A torch-free stand-in for the worker that keeps a simulated paged KV cache.

Each slot stores the (token id, position) written into it. The "model" reads a sequence's
whole context back through its block table and hashes it into the next token, so a wrong
block table, a prefix-cache hit on the wrong block or a block reused too early changes the
output. Step semantics are the real worker's (see worker.proto): finished ids first, new
requests in full, cached ones as deltas, sample when the scheduled chunk reaches the end of
the known tokens. Steps and results are the engine's dataclasses (`splitserve.common.messages`),
as with the in-process executor.

With `pipeline_parallel_size` P > 1 it also plays the ranks that do not sample: it keeps rank
0's copy of every request's tokens, fed only by new requests and `new_token_ids`, and fails
when a step needs a token rank 0 was never given, or schedules a request again while one of
its sampled tokens is still in flight.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field

from splitserve.common import messages as msg
from splitserve.protos import worker_pb2


@dataclass
class _Req:
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int
    trace: list[int] = field(default_factory=list)
    num_prompt: int = 0


def next_token(context: list[tuple[int, int]], vocab_size: int) -> int:
    h = hashlib.sha256(repr(context).encode()).digest()
    return int.from_bytes(h[:4], "little") % vocab_size


class FakeWorkerExecutor:
    def __init__(
        self,
        num_blocks: int,
        vocab_size: int = 1000,
        max_model_len: int = 4096,
        eos_token_ids: tuple[int, ...] = (),
        bytes_per_block: int = 1,
        step_seconds: float = 0.0,
        pipeline_parallel_size: int = 1,
        state_slot_bytes: int = 0,
        sliding_window: int | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids)
        self.bytes_per_block = bytes_per_block
        self.state_slot_bytes = state_slot_bytes
        """> 0: play a model with one attention layer and one recurrent-state layer whose
        state takes this many bytes per request (the budget then also holds the slots)."""
        self.sliding_window = sliding_window
        """Play a model whose one attention layer slides: a context is read back only over
        the last `sliding_window` positions."""
        self.num_state_slots = 0
        self.slot_of: dict[str, int] = {}
        """Recurrent models: the state slot of every live request."""
        self.max_slots_in_use = 0
        self.states: dict[int, list[int]] = {}
        """Recurrent models: each slot's simulated state, the tokens folded into it so far
        (restores and snapshots copy it; a request's state must always equal its computed
        tokens)."""
        self.num_restores = 0
        self.step_seconds = step_seconds
        """Simulated compute time per step (service tests need steps that take a while)."""
        self.reqs: dict[str, _Req] = {}
        self.cache: dict[int, tuple[int, int]] = {}
        self.block_size = 0
        self.steps: list[msg.StepRequest] = []
        self._results: deque[msg.StepResult] = deque()
        self.force_token: dict[str, list[int]] = {}
        """Per request, tokens to emit instead of the hashed ones (to test stop rules)."""
        self.pipeline_parallel_size = pipeline_parallel_size
        self.rank0_tokens: dict[str, list[int]] = {}
        """P > 1: the tokens rank 0 knows, per request."""
        self.max_outstanding = 0
        """Most steps submitted and not yet answered at once."""
        self.grammar_ends_after: dict[str, int] = {}
        """Per request, the output length at which its grammar terminates."""
        self.grammars_seen: dict[str, list[bytes]] = {}
        """Per request, the compiled grammar of every NewRequest (b"" when none)."""
        self.grammar_specs_seen: dict[str, list[msg.GrammarSpec]] = {}
        """Per request, the uncompiled constraint (grammar_spec) of every NewRequest that had one."""
        self.defer_first: dict[str, int] = {}
        """Per request, how many times it is deferred (no token, its grammar compiling) at
        its first sampling position after each time it arrives as new."""
        self.num_deferred = 0
        self._defer_left: dict[str, int] = {}
        self._deferred: set[str] = set()

    def describe(self, block_size: int, engine=None) -> list[worker_pb2.DescribeResponse]:
        # States no engine fields: the scheduler keeps its own.
        return [
            worker_pb2.DescribeResponse(
                rank=rank,
                world_size=self.pipeline_parallel_size,
                vocab_size=self.vocab_size,
                max_model_len=self.max_model_len,
                eos_token_ids=self.eos_token_ids,
                bytes_per_block=self.bytes_per_block,
                available_kv_bytes=self.num_blocks * self.bytes_per_block,
                model="fake",
                cache_specs=self._cache_specs(),
            )
            for rank in range(self.pipeline_parallel_size)
        ]

    def _cache_specs(self) -> list[worker_pb2.LayerCacheSpec]:
        kind = worker_pb2.LayerCacheSpec.Kind
        if self.sliding_window:
            return [
                worker_pb2.LayerCacheSpec(
                    layer_idx=0,
                    kind=kind.KIND_SLIDING_WINDOW,
                    sliding_window=self.sliding_window,
                    page_bytes=self.bytes_per_block,
                )
            ]
        if not self.state_slot_bytes:
            return []
        return [
            worker_pb2.LayerCacheSpec(
                layer_idx=0, kind=kind.KIND_FULL_ATTENTION, page_bytes=self.bytes_per_block
            ),
            worker_pb2.LayerCacheSpec(
                layer_idx=1, kind=kind.KIND_RECURRENT_STATE, page_bytes=self.state_slot_bytes
            ),
        ]

    def initialize_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_state_slots = num_state_slots

    def submit(self, step: msg.StepRequest) -> None:
        self.steps.append(step)
        if self.pipeline_parallel_size > 1:
            self._check_pipeline(step)
        self._results.append(self._execute(step))
        self.max_outstanding = max(self.max_outstanding, len(self._results))

    def _check_pipeline(self, step: msg.StepRequest) -> None:
        sampling = {rid for res in self._results for rid in res.request_ids}
        again = sampling & set(step.num_scheduled_tokens)
        assert not again, f"step {step.step_id} schedules {again} while their tokens are in flight"
        for rid in step.finished_request_ids:
            self.rank0_tokens.pop(rid, None)
        for m in step.new_requests:
            self.rank0_tokens[m.request_id] = list(m.token_ids)
        for c in step.cached_requests:
            self.rank0_tokens[c.request_id].extend(c.new_token_ids)
        starts = {
            m.request_id: (m.num_computed_tokens, list(m.token_ids)) for m in step.new_requests
        }
        for c in step.cached_requests:
            starts[c.request_id] = (c.num_computed_tokens, self.reqs[c.request_id].token_ids)
        for rid, n in step.num_scheduled_tokens.items():
            first, truth = starts[rid]
            known = self.rank0_tokens[rid][: first + n]
            assert known == truth[: first + n], f"{rid}: rank 0 cannot embed [{first}, {first + n})"

    def get_result(self) -> msg.StepResult:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return self._results.popleft()

    def shutdown(self) -> None:
        pass

    def _slot(self, r: _Req, pos: int) -> int:
        bid = r.block_ids[pos // self.block_size]
        assert 0 <= bid < self.num_blocks, bid
        return bid * self.block_size + pos % self.block_size

    def _execute(self, step: msg.StepRequest) -> msg.StepResult:
        for rid in step.finished_request_ids:
            self.reqs.pop(rid, None)
            self.slot_of.pop(rid, None)
        for m in step.new_requests:
            assert m.request_id not in self.reqs, f"{m.request_id} sent as new twice"
            if self.num_state_slots:
                assert 0 <= m.state_slot < self.num_state_slots, (m.request_id, m.state_slot)
                assert m.state_slot not in self.slot_of.values(), f"slot {m.state_slot} shared"
                if m.num_computed_tokens:
                    src = self.states.get(m.restore_state_slot)
                    assert src == list(m.token_ids[: m.num_computed_tokens]), (
                        f"{m.request_id}: snapshot {m.restore_state_slot} holds the wrong state"
                    )
                    self.states[m.state_slot] = list(src)
                    self.num_restores += 1
                else:
                    self.states[m.state_slot] = []
                self.slot_of[m.request_id] = m.state_slot
                self.max_slots_in_use = max(self.max_slots_in_use, len(self.slot_of))
            else:
                assert m.state_slot == -1, m.request_id
            self.reqs[m.request_id] = _Req(
                list(m.token_ids), list(m.block_ids), m.num_computed_tokens
            )
            self.reqs[m.request_id].num_prompt = m.num_prompt_tokens
            self._defer_left[m.request_id] = self.defer_first.get(m.request_id, 0)
            self._deferred.discard(m.request_id)
            assert not (m.grammar is not None and m.grammar_spec is not None), m.request_id
            self.grammars_seen.setdefault(m.request_id, []).append(
                m.grammar.compiled if m.grammar is not None else b""
            )
            if m.grammar_spec is not None:
                self.grammar_specs_seen.setdefault(m.request_id, []).append(m.grammar_spec)
        for c in step.cached_requests:
            r = self.reqs[c.request_id]
            # A step planned before the scheduler saw a deferral counts the deferred position
            # as computed; the worker computes it again (as the real one does).
            late = c.request_id in self._deferred and c.num_computed_tokens == r.num_computed + 1
            assert late or r.num_computed == c.num_computed_tokens, (
                c.request_id,
                r.num_computed,
                c.num_computed_tokens,
            )
            r.block_ids.extend(c.new_block_ids)
        out = msg.StepResult(step_id=step.step_id)
        # Write every scheduled token's KV first (as the real worker does per layer) ...
        for rid, n in step.num_scheduled_tokens.items():
            r = self.reqs[rid]
            assert r.num_computed + n <= len(r.token_ids), (rid, r.num_computed, n)
            for pos in range(r.num_computed, r.num_computed + n):
                self.cache[self._slot(r, pos)] = (r.token_ids[pos], pos)
        if self.num_state_slots:
            for rid, n in step.num_scheduled_tokens.items():
                r, state = self.reqs[rid], self.states[self.slot_of[rid]]
                assert state == r.token_ids[: r.num_computed], f"{rid}: state out of step"
                state.extend(r.token_ids[r.num_computed : r.num_computed + n])
        # ... then read contexts back and sample.
        for rid, n in step.num_scheduled_tokens.items():
            r = self.reqs[rid]
            r.num_computed += n
            if r.num_computed == len(r.token_ids):
                first = max(0, r.num_computed - self.sliding_window) if self.sliding_window else 0
                ctx = [self.cache.get(self._slot(r, p)) for p in range(first, r.num_computed)]
                assert all(c is not None and c[1] == p for p, c in enumerate(ctx, first)), (
                    f"{rid}: context read back wrong"
                )
                if self._defer_left.get(rid, 0) > 0:
                    self._defer_left[rid] -= 1
                    self._deferred.add(rid)
                    self.num_deferred += 1
                    r.num_computed -= 1  # computed again by a later step
                    out.deferred_request_ids.append(rid)
                    continue
                self._deferred.discard(rid)
                forced = self.force_token.get(rid)
                tok = forced.pop(0) if forced else next_token(ctx, self.vocab_size)
                r.token_ids.append(tok)
                out.request_ids.append(rid)
                out.token_ids.append(tok)
                out.logprobs.append(None)
                ends = self.grammar_ends_after.get(rid)
                if ends is not None and len(r.token_ids) - r.num_prompt == ends:
                    out.grammar_terminated_ids.append(rid)
        for rid, slot in step.state_snapshots:
            assert self.num_state_slots and 0 <= slot < self.num_state_slots, slot
            assert slot not in self.slot_of.values(), f"snapshot into running slot {slot}"
            self.states[slot] = list(self.states[self.slot_of[rid]])
        return out
