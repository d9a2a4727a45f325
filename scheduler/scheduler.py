"""The step planner: waiting/running queues, token budget, preemption, stop checks.

No torch, and no protobuf message per step: it takes requests as `messages.GenerateRequest`,
plans steps as `messages.StepRequest` dataclasses (new requests in full, running ones as
deltas) and reads back `messages.StepResult`; the gRPC executor and the scheduler's service
convert at their edges, the in-process engine passes them straight through. Steps may be
planned before earlier results are back (async scheduling): a running request then carries
`num_inflight` placeholder tokens that the workers already know and the scheduler learns later.

With pipeline parallelism (`pipeline_parallel_size` P > 1) a token is sampled on the last rank
but embedded on rank 0, so placeholders cannot work: a request that awaits a sampled token
is left out of new steps until that token is back, and the scheduler then hands it to the
ranks in `CachedRequest.new_token_ids`. Up to P steps are outstanding, each a micro-batch of
other requests (at most ceil(requests / P) each, so the stages get batches of similar size).
Prompt chunks that sample nothing may still follow each other in flight: every rank runs steps
in order, so a chunk's KV is written before the next chunk reads it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from dataclasses import dataclass, field

from splitserve.common import messages as msg
from splitserve.common.pooling import dimensions_problem, finish_embedding
from splitserve.protos import common_pb2, scheduler_pb2

from .config import SchedulerConfig
from .encoder_cache import EncoderCache
from .kv_cache_manager import KVCacheManager
from .lora_adapters import AdapterTable
from .lora_residency import LoRAResidency
from .request import Request, RequestStatus
from .step_tokens import StepTokenHistogram

logger = logging.getLogger(__name__)

FinishReason = common_pb2.FinishReason


class RequestRejected(Exception):
    """A request the scheduler refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A plain int: `finished` runs for every output of every step (an enum wrapper's attribute
# is a slow lookup).
_UNSPECIFIED = int(FinishReason.FINISH_REASON_UNSPECIFIED)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[msg.TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[msg.TokenLogprobs] = field(default_factory=list)
    finish_reason: int = FinishReason.FINISH_REASON_UNSPECIFIED
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str = ""
    error_code: str = ""
    """A grpc.StatusCode name when `error` is set."""
    first_scheduled_ns: int = 0
    """Wall-clock time (ns) the request was first scheduled (queue time, tracing)."""
    embedding: list[float] | None = None
    """Pooling requests: the finished embedding, on the last output."""

    @property
    def finished(self) -> bool:
        return self.finish_reason != _UNSPECIFIED


def failed_output(request_id: str, code: str, message: str) -> RequestOutput:
    """A request's end by an error (`code`: a grpc.StatusCode name) as its last output."""
    return RequestOutput(
        request_id, error=message, error_code=code, finish_reason=FinishReason.FINISH_REASON_ERROR
    )


def request_constraint(
    req: msg.GenerateRequest,
) -> msg.CompiledGrammar | msg.GrammarSpec | None:
    """The request's structured-output constraint: compiled (the gateway compiled it in its
    Prepare call) or a spec (a direct Generate caller), or None; both is INVALID_ARGUMENT.

    NOTE: the scheduler compiles nothing and holds no tokenizer: the sampling rank builds its
    matcher from either form, so a constraint costs no call from here, and a bad spec fails
    its request with INVALID_ARGUMENT when it reaches that rank."""
    if req.compiled_grammar is not None:
        if req.grammar is not None:
            raise RequestRejected("INVALID_ARGUMENT", "give grammar or compiled_grammar, not both")
        return req.compiled_grammar
    return req.grammar


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: list[int],
        pipeline_parallel_size: int = 1,
        runner_info: common_pb2.RunnerInfo | None = None,
        num_state_slots: int = 0,
        sliding_window: int | None = None,
    ) -> None:
        config.check_model_len(max_model_len)
        self.runner_info = runner_info or common_pb2.RunnerInfo(runner="generate")
        """The workers' runner; a pooling runner serves only pooling requests."""
        self.config = config
        self.pipeline_parallel_size = pipeline_parallel_size
        """Pipeline ranks behind the executor (see the module docstring)."""
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv = KVCacheManager(
            num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            num_state_slots,
            sliding_window,
        )
        """The cache coordinator: paged blocks, and state slots with recurrent layers."""
        self.adapters = AdapterTable(config.lora_modules)
        """The LoRA adapters served by name (loads, unloads and lists from every front end)."""
        self.lora_residency = LoRAResidency(config.max_loras, config.max_cpu_loras)
        """Which adapters the workers hold in CPU memory and in which device slots."""
        self.encoder = EncoderCache(config.encoder_cache_tokens, config.encoder_budget)
        """Which encoder outputs (images, audio) the first worker rank holds, by item hash."""
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        """Sorted by arrival (fcfs) or by (priority, arrival) (--scheduling-policy priority)."""
        self._by_priority = config.scheduling_policy == "priority"
        self.running: list[Request] = []
        self._arrival = itertools.count()
        self._step_ids = itertools.count()
        self._finished_for_workers: list[str] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_prompt_tokens = 0
        """Prompt tokens computed so far (recomputed ones again), for the stats line."""
        self.num_generation_tokens = 0
        """Tokens sampled so far, for the stats line."""
        self.step_tokens = StepTokenHistogram()
        """Tokens scheduled per step (vllm:iteration_tokens_total)."""

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        req: msg.GenerateRequest,
        grammar: msg.CompiledGrammar | msg.GrammarSpec | None = None,
    ) -> Request:
        """Validate and queue a request (with its constraint, compiled or as a spec, if it has
        one; see `request_constraint`); raises RequestRejected."""
        rid = req.request_id
        if not rid:
            raise RequestRejected("INVALID_ARGUMENT", "request_id must not be empty")
        if rid in self.requests:
            raise RequestRejected("ALREADY_EXISTS", f"request id {rid!r} is already running")
        prompt = list(req.prompt_token_ids)
        sp = req.sampling_params
        self._validate_runner(req)
        if req.pooling:
            self.validate_pooling(prompt, req.lora_name)
            sp = msg.SamplingParams()
        else:
            self.validate(prompt, sp, req.lora_name)
        self.check_priority(req.priority)
        lora_path, lora_int_id = self.resolve_lora(req)
        self._validate_mm(req)
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise RequestRejected(
                "RESOURCE_EXHAUSTED",
                f"the waiting queue is full ({len(self.waiting)} requests); retry later",
            )
        room = self.max_model_len - len(prompt)
        max_tokens = room if sp.max_tokens is None else min(sp.max_tokens, room)
        if req.pooling:
            max_tokens = 1  # its one "step result" is the pooled state
        r = Request(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling_params=sp,
            max_tokens=max_tokens,
            eos_token_ids=frozenset() if sp.ignore_eos else self.eos_token_ids,
            stop_token_ids=frozenset(sp.stop_token_ids),
            min_tokens=sp.min_tokens or 0,
            arrival=next(self._arrival),
            priority=req.priority,
            lora_name=req.lora_name,
            lora_path=lora_path,
            cache_salt=req.cache_salt,
            lora_int_id=lora_int_id,
            prompt_logprobs_pending=sp.prompt_logprobs is not None,
            grammar=grammar,
            mm_inputs=list(req.mm_inputs),
            mm_spans=tuple((m.offset, m.length, m.hash) for m in req.mm_inputs),
            pooling=req.pooling,
            dimensions=req.dimensions,
            normalize=req.normalize,
        )
        self.requests[rid] = r
        self._enqueue_waiting(r)
        return r

    @property
    def is_pooling(self) -> bool:
        return self.runner_info.runner == "pooling"

    def _validate_runner(self, req: msg.GenerateRequest) -> None:
        """A pooling runner serves only pooling requests, a generate runner none."""
        if req.pooling and not self.is_pooling:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                "this model does not support the Embeddings API: it runs with --runner "
                f"{self.runner_info.runner or 'generate'} (start it with --runner pooling)",
            )
        if not req.pooling and self.is_pooling:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                "this model runs with --runner pooling and serves only embeddings; "
                "generation is not supported",
            )
        if req.pooling and (req.grammar is not None or req.compiled_grammar is not None):
            raise RequestRejected(
                "INVALID_ARGUMENT", "a pooling request takes no structured-output constraint"
            )
        if req.dimensions is not None:
            info = self.runner_info
            problem = dimensions_problem(
                req.dimensions,
                "This model",
                info.is_matryoshka,
                list(info.matryoshka_dimensions),
                info.hidden_size,
            )
            if problem:
                raise RequestRejected("INVALID_ARGUMENT", problem)

    def vocab_limit(self, lora_name: str = "") -> int:
        """Token ids of a request lie below this. A request through a LoRA adapter may use the
        tokens adapters add, up to --lora-extra-vocab-size past the base vocabulary; the
        scheduler never opens adapter files, so the exact bound (what that adapter adds) is
        the worker's check, which fails the request with its own message."""
        return self.vocab_size + (self.config.lora_extra_vocab_size if lora_name else 0)

    def _check_prompt_ids(self, prompt: list[int], lora_name: str = "") -> int:
        """The prompt's length; RequestRejected when it is empty or leaves the vocabulary."""
        if not prompt:
            raise RequestRejected("INVALID_ARGUMENT", "the prompt must hold at least one token")
        lo, hi = min(prompt), max(prompt)
        limit = self.vocab_limit(lora_name)
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"prompt token id {bad} is outside the vocabulary [0, {limit})",
            )
        return len(prompt)

    def validate_pooling(self, prompt: list[int], lora_name: str = "") -> None:
        """validate() for an embedding request: the whole context may hold the prompt."""
        n = self._check_prompt_ids(prompt, lora_name)
        if n > self.max_model_len:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"the input has {n} tokens but the maximum context length is {self.max_model_len}",
            )
        need = self.kv.blocks_for(n)
        if need > self.kv.pool.num_blocks:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"the prompt needs {need} KV blocks but the cache holds "
                f"only {self.kv.pool.num_blocks}",
            )

    def resolve_lora(self, req: msg.GenerateRequest) -> tuple[str, int]:
        """(folder, load number) of the request's adapter; ("", 0) for the base model.

        A name in the adapter table is that adapter (a path or number the request also gives
        must agree). A name the table does not hold needs its folder in the request: the
        direct-caller form (vLLM's LoRARequest), keyed by the number the caller gives."""
        name = req.lora_name
        if not name:
            if req.lora_path:
                raise RequestRejected("INVALID_ARGUMENT", "lora_path given without lora_name")
            return "", 0
        if not self.config.enable_lora:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"LoRA adapter {name!r} asked for, but the server runs without --enable-lora",
            )
        adapter = self.adapters.get(name)
        if adapter is None:
            if not req.lora_path:
                raise RequestRejected(
                    "NOT_FOUND",
                    f"The lora adapter '{name}' is not loaded (load it first, or give its "
                    "lora_path)",
                )
            return req.lora_path, req.lora_int_id
        if req.lora_path and req.lora_path != adapter.path:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"lora_path {req.lora_path!r} is not the folder of the loaded adapter {name!r} "
                f"({adapter.path!r}); leave lora_path empty to use the loaded one",
            )
        if req.lora_int_id and req.lora_int_id != adapter.int_id:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"lora_int_id {req.lora_int_id} is not the load number of adapter {name!r} "
                f"({adapter.int_id}); leave it 0 to use the loaded one",
            )
        return adapter.path, adapter.int_id

    def _validate_mm(self, req: msg.GenerateRequest) -> None:
        """Images must sit inside the prompt, in order, apart, each with its hash (the
        worker checks the rest: the model takes images, the spans hold image tokens)."""
        end, n = 0, len(req.prompt_token_ids)
        for i, m in enumerate(req.mm_inputs):
            if m.length < 1 or m.offset < end or m.offset + m.length > n:
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"mm_inputs[{i}]: placeholder span [{m.offset}, {m.offset + m.length}) must "
                    f"be non-empty, after the previous image and inside the {n}-token prompt",
                )
            if len(m.hash) != 32:
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"mm_inputs[{i}]: hash must be a 32-byte SHA-256 digest, got {len(m.hash)} bytes",
                )
            end = m.offset + m.length
            cache, budget = self.config.encoder_cache_tokens, self.config.encoder_budget
            if m.length > min(cache, budget):
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"mm_inputs[{i}]: {m.length} placeholder tokens exceed the encoder budget "
                    f"(--encoder-cache-size {cache}, --max-num-encoder-input-tokens {budget})",
                )

    def _lora_fits(self, req: Request) -> bool:
        """Whether admitting `req` keeps the running adapters within max_loras (every running
        request may be in one step, so this bounds the adapters of any step)."""
        if not req.lora_name:
            return True
        # NOTE: two loads of one name (reloaded while old requests still run) are two
        # adapters on the worker, each with its own slot.
        running = {(r.lora_name, r.lora_int_id) for r in self.running if r.lora_name}
        return (req.lora_name, req.lora_int_id) in running or len(running) < self.config.max_loras

    def validate(self, prompt: list[int], sp: msg.SamplingParams, lora_name: str = "") -> None:
        """Raise RequestRejected for a request that can never run; reads only fixed state."""
        n = self._check_prompt_ids(prompt, lora_name)
        if n >= self.max_model_len:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"the prompt has {n} tokens but the maximum context length is "
                f"{self.max_model_len}: leave room for at least one output token",
            )
        if sp.max_tokens is not None:
            if sp.max_tokens < 1:
                raise RequestRejected(
                    "INVALID_ARGUMENT", f"max_tokens must be at least 1, got {sp.max_tokens}"
                )
            if n + sp.max_tokens > self.max_model_len:
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"the prompt ({n} tokens) plus max_tokens ({sp.max_tokens}) is "
                    f"{n + sp.max_tokens}, over the maximum context length of "
                    f"{self.max_model_len} tokens",
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(sp, name)
            if value is not None and not 0 <= value <= self.config.max_logprobs:
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"{name} must be between 0 and {self.config.max_logprobs}, got {value}",
                )
        need = self.kv.blocks_for(n + 1)
        if need > self.kv.pool.num_blocks:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"the prompt needs {need} KV blocks but the cache holds "
                f"only {self.kv.pool.num_blocks}",
            )

    def check_priority(self, priority: int) -> None:
        """Under fcfs a priority cannot be honoured, so it is refused (as vLLM does)."""
        if priority and not self._by_priority:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"priority {priority} needs a server started with --scheduling-policy "
                "priority; this one schedules first-come-first-served (fcfs)",
            )

    def _enqueue_waiting(self, r: Request) -> None:
        r.status = RequestStatus.WAITING
        # NOTE: a preempted request keeps its arrival, so it goes back ahead of later ones.
        if self._by_priority:
            keys = [(q.priority, q.arrival) for q in self.waiting]
            self.waiting.insert(bisect.bisect(keys, (r.priority, r.arrival)), r)
        else:
            self.waiting.insert(bisect.bisect([q.arrival for q in self.waiting], r.arrival), r)

    def _victim(self, scheduled: dict[str, int]) -> Request:
        """The running request to preempt: the latest admitted (fcfs), or, among those not
        yet in this step, the one with the highest priority value, latest arrival among
        equals (priority)."""
        if self._by_priority:
            candidates = [q for q in self.running if q.request_id not in scheduled]
            return max(candidates, key=lambda q: (q.priority, q.arrival))
        return self.running[-1]

    def abort_request(self, request_id: str) -> bool:
        r = self.requests.get(request_id)
        if r is None:
            return False
        self._finish(r)
        return True

    def _finish(self, r: Request) -> None:
        if r.status == RequestStatus.RUNNING:
            self.running.remove(r)
        elif r.status == RequestStatus.WAITING:
            self.waiting.remove(r)
        r.status = RequestStatus.FINISHED
        self.kv.free(r)
        if r.mm_spans:
            self.encoder.release(r.request_id, r.mm_spans)
        if r.known_to_worker:
            self._finished_for_workers.append(r.request_id)
            r.known_to_worker = False
        del self.requests[r.request_id]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ planning
    def schedule(self) -> msg.StepRequest | None:
        """Plan the next step, or None when nothing can run now."""
        budget = self.config.max_num_batched_tokens
        step = msg.StepRequest()
        scheduled: dict[str, int] = {}
        preempted = False
        pipelined = self.pipeline_parallel_size > 1
        max_seqs = self._max_seqs_per_step()
        encoder = self.encoder
        encoder.begin_step()
        # NOTE: references are dropped here, not when the chunk that passes an item is planned:
        # an output this step's own forward still reads must not be evicted by this step.
        # (Nothing held, nothing to drop: text-only models skip the walk over running.)
        if encoder.entries:
            for r in self.running:
                if r.mm_spans:
                    encoder.release_computed(r.request_id, r.mm_spans, r.num_computed_tokens)

        for req in list(self.running):
            if budget == 0 or len(scheduled) >= max_seqs:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if pipelined and req.num_inflight:
                continue  # its next input token is still being sampled
            n = self._tokens_to_schedule(req, budget)
            if n and req.mm_spans:
                n = encoder.fit(req.request_id, req.mm_spans, req.num_computed_tokens, n)
            if n == 0:
                continue
            n = self.kv.align_chunk(req, req.num_computed_tokens, n)
            while True:
                new_blocks = self.kv.allocate_slots(req, n)
                if new_blocks is not None:
                    break
                victim = self._victim(scheduled)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            num_computed = req.num_computed_tokens
            if req.mm_spans:
                encoder.commit(req.request_id, req.mm_spans, num_computed, n)
            self._commit(req, n)
            self._snapshot(step, req)
            if req.known_to_worker:
                c = msg.CachedRequest(
                    req.request_id,
                    [b.block_id for b in req.blocks[req.num_sent_blocks :]],
                    num_computed,
                )
                step.cached_requests.append(c)
                req.num_sent_blocks = len(req.blocks)
                if pipelined:
                    c.new_token_ids = req.output_token_ids[
                        req.num_sent_tokens - req.num_prompt_tokens :
                    ]
                    req.num_sent_tokens = req.num_tokens
            else:
                self._add_new(step, req, num_computed)
            scheduled[req.request_id] = n
            budget -= n

        # NOTE: no new admissions in a step that had to preempt: the pool is short.
        idx = 0
        while (
            not preempted
            and budget > 0
            and idx < len(self.waiting)
            and len(self.running) < self.config.max_num_seqs
            and len(scheduled) < max_seqs
        ):
            req = self.waiting[idx]
            if req.num_inflight:
                idx += 1  # its last in-flight token must come back before it can resume
                continue
            if not self._lora_fits(req):
                idx += 1  # its adapter needs a slot: it waits until one frees
                continue
            if req.pooling and self.runner_info.pooling_type != "LAST":
                # NOTE: MEAN/CLS pool positions a cache hit would skip: compute all of them.
                hits, num_hit = [], 0
            else:
                hits, num_hit = self.kv.get_computed_blocks(req)
                if self.kv.snapshot_coming(req, num_hit):
                    idx += 1  # a request of this step snapshots a longer prefix: wait a step
                    continue
            remaining = req.num_tokens - num_hit
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            n = min(remaining, budget)
            if req.mm_spans:
                n = encoder.fit(req.request_id, req.mm_spans, num_hit, n)
                if n == 0 or (n < remaining and not self.config.enable_chunked_prefill):
                    break  # its next item waits for encoder budget or cache room
            if self.config.enable_chunked_prefill:
                n = self.kv.align_chunk(req, num_hit, n)
            if self.kv.allocate_slots(req, n, hits) is None:
                break
            self.waiting.pop(idx)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            req.num_computed_tokens = num_hit
            if not req.first_scheduled_ns:
                req.first_scheduled_ns = time.time_ns()
            self.kv.record_lookup(req.num_tokens, num_hit)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.mm_spans:
                encoder.commit(req.request_id, req.mm_spans, num_hit, n)
            self._commit(req, n)
            self._add_new(step, req, num_hit)
            self._snapshot(step, req)
            scheduled[req.request_id] = n
            budget -= n

        if not scheduled:
            return None  # NOTE: ended ids stay for the next step that runs
        if self._finished_for_workers:
            step.finished_request_ids = self._finished_for_workers
            self._finished_for_workers = []
        if self.config.enable_lora:
            self._place_loras(step, scheduled)
        step.encoder_evictions = encoder.take_evictions()
        step.num_scheduled_tokens = scheduled
        step.step_id = next(self._step_ids)
        self.kv.seal_snapshots(step.step_id)
        self.num_steps += 1
        self.step_tokens.observe(sum(scheduled.values()))
        return step

    def _place_loras(self, step: msg.StepRequest, scheduled: dict[str, int]) -> None:
        """The step's adapter evictions and device slots (`lora_residency`)."""
        running = {(r.lora_name, r.lora_int_id) for r in self.running if r.lora_name}
        used = set()
        for rid in scheduled:
            r = self.requests[rid]
            if r.lora_name:
                used.add((r.lora_name, r.lora_int_id))
        placement = self.lora_residency.place(used, running, self.adapters.take_unloaded())
        step.lora_evictions = placement.evictions
        step.lora_slots = placement.slots

    def release_step(self) -> msg.StepRequest | None:
        """A step that runs nothing and only tells the workers which requests ended, for when
        no step is planned: an aborted or stop-string request must not keep its worker row and
        grammar matcher until some later request comes. None when there is nothing to tell."""
        if not self._finished_for_workers:
            return None
        step = msg.StepRequest(
            step_id=next(self._step_ids), finished_request_ids=self._finished_for_workers
        )
        self._finished_for_workers = []
        return step

    @property
    def has_release_pending(self) -> bool:
        """Whether ended requests still have to be reported to the workers."""
        return bool(self._finished_for_workers)

    def _max_seqs_per_step(self) -> int:
        """Requests one step may take: all of them with one rank; with P ranks a P-th of
        those that can run at once, so the P micro-batches in flight are alike in size."""
        if self.pipeline_parallel_size == 1:
            return self.config.max_num_seqs
        active = min(len(self.requests), self.config.max_num_seqs)
        return max(1, -(-active // self.pipeline_parallel_size))

    def _tokens_to_schedule(self, req: Request, budget: int) -> int:
        if req.pooling:  # prompt-only: until its last chunk is in flight
            return 0 if req.num_inflight else min(req.num_tokens - req.num_computed_tokens, budget)
        if req.num_output_with_inflight >= req.max_tokens:
            return 0
        if req.num_tokens_with_inflight >= self.max_model_len:
            return 0
        return min(req.num_tokens_with_inflight - req.num_computed_tokens, budget)

    def _commit(self, req: Request, n: int) -> None:
        p = req.num_prompt_tokens
        self.num_prompt_tokens += min(req.num_computed_tokens + n, p) - min(
            req.num_computed_tokens, p
        )
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens_with_inflight:
            req.num_inflight += 1  # this step samples the request's next token
        self.kv.cache_blocks(req)

    def _snapshot(self, step: msg.StepRequest, req: Request) -> None:
        # NOTE: a pending snapshot's slot cannot run a request: leave one per waiting request.
        slot = self.kv.take_snapshot(req, reserve=len(self.waiting))
        if slot is not None:
            step.state_snapshots.append((req.request_id, slot))

    def _add_new(self, step: msg.StepRequest, req: Request, num_computed: int) -> None:
        # NOTE: the lists are the worker's own (the in-process worker may keep them), except
        # the request's fixed parts (sampling params, constraint, images), which nobody edits.
        m = msg.NewRequest(
            request_id=req.request_id,
            token_ids=req.prompt_token_ids + req.output_token_ids,
            sampling_params=req.sampling_params,
            block_ids=[b.block_id for b in req.blocks],
            num_computed_tokens=num_computed,
            num_prompt_tokens=req.num_prompt_tokens,
            mm_inputs=req.mm_inputs,
            state_slot=req.state_slot,
            restore_state_slot=req.restore_state_slot if num_computed else -1,
        )
        if req.trace_context:
            m.trace_context = dict(req.trace_context)
        if isinstance(req.grammar, msg.CompiledGrammar):
            m.grammar = req.grammar
        elif req.grammar is not None:
            m.grammar_spec = req.grammar
        if req.lora_name:
            m.lora_name, m.lora_path = req.lora_name, req.lora_path
            m.lora_int_id = req.lora_int_id
        step.new_requests.append(m)
        req.num_sent_tokens = req.num_tokens
        req.known_to_worker = True
        req.num_sent_blocks = len(req.blocks)

    def _preempt(self, req: Request) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, requeue."""
        logger.debug("preempting %s at %d tokens", req.request_id, req.num_tokens)
        self.running.remove(req)
        self.kv.free(req)
        if req.mm_spans:
            self.encoder.release(req.request_id, req.mm_spans)
        req.num_computed_tokens = 0
        if req.known_to_worker:
            self._finished_for_workers.append(req.request_id)
            req.known_to_worker = False
        req.num_sent_blocks = 0
        self.num_preemptions += 1
        self._enqueue_waiting(req)

    # ------------------------------------------------------------------ results
    def update_from_output(self, result: msg.StepResult) -> list[RequestOutput]:
        """Apply a step's sampled tokens; returns one output per request that changed."""
        outputs: dict[str, RequestOutput] = {}
        self.kv.publish_snapshots(result.step_id, set(result.errors))
        grammar_done = set(result.grammar_terminated_ids)
        for rid, entries in result.prompt_logprobs.items():
            r = self.requests.get(rid)
            if r is not None and r.prompt_logprobs_pending:
                out = outputs.setdefault(rid, self._output(r))
                out.prompt_logprobs.extend(entries)
        for i, rid in enumerate(result.request_ids):
            r = self.requests.get(rid)
            if r is None:
                continue  # finished or aborted while this step ran
            r.num_inflight -= 1
            if rid in result.errors:
                continue  # failed in this step (its grammar, say): the token is not output
            tok = result.token_ids[i]
            r.output_token_ids.append(tok)
            self.num_generation_tokens += 1
            out = outputs.setdefault(rid, self._output(r))
            out.token_ids.append(tok)
            if r.sampling_params.logprobs is not None:
                out.logprobs.append(result.logprobs[i])
            if r.prompt_logprobs_pending:
                r.prompt_logprobs_pending = False
            self._check_stop(r, tok, out)
            if rid in grammar_done and not out.finished:
                out.finish_reason = FinishReason.FINISH_REASON_STOP
            if out.finished:
                self._finish(r)
            else:
                self.kv.cache_blocks(r)
        for pooled in result.pooled:
            r = self.requests.get(pooled.request_id)
            if r is None or pooled.request_id in result.errors:
                continue  # aborted while this step ran
            r.num_inflight -= 1
            out = outputs.setdefault(r.request_id, self._output(r))
            normalize = self.runner_info.normalize if r.normalize is None else r.normalize
            vec = finish_embedding(pooled.data, r.dimensions, normalize)
            out.embedding = vec.tolist()
            out.finish_reason = FinishReason.FINISH_REASON_STOP
            self._finish(r)
        for rid in result.deferred_request_ids:
            r = self.requests.get(rid)
            if r is None:
                continue
            # NOTE: the worker did not sample it (its grammar is compiling): the last position
            # is computed again, so the request stays schedulable and no other row waits.
            r.num_inflight -= 1
            if r.status == RequestStatus.RUNNING:
                r.num_computed_tokens -= 1
        for rid, message in result.errors.items():
            r = self.requests.get(rid)
            if r is None:
                continue
            out = outputs.setdefault(rid, self._output(r))
            out.finish_reason = FinishReason.FINISH_REASON_ERROR
            out.error = message
            out.error_code = "INVALID_ARGUMENT"
            self._finish(r)
        return list(outputs.values())

    def _output(self, r: Request) -> RequestOutput:
        return RequestOutput(
            r.request_id,
            num_prompt_tokens=r.num_prompt_tokens,
            num_cached_tokens=max(r.num_cached_tokens, 0),
            first_scheduled_ns=r.first_scheduled_ns,
        )

    def _check_stop(self, r: Request, tok: int, out: RequestOutput) -> None:
        n_out = len(r.output_token_ids)
        if n_out >= r.min_tokens:
            if tok in r.stop_token_ids:
                out.finish_reason = FinishReason.FINISH_REASON_STOP
                out.stop_token_id = tok
                return
            if tok in r.eos_token_ids:
                out.finish_reason = FinishReason.FINISH_REASON_STOP
                return
        if n_out >= r.max_tokens or r.num_tokens >= self.max_model_len:
            out.finish_reason = FinishReason.FINISH_REASON_LENGTH

    # ------------------------------------------------------------------ stats
    def stats(self) -> scheduler_pb2.SchedulerStats:
        return scheduler_pb2.SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_total_blocks=self.kv.pool.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            block_size=self.config.block_size,
            iteration_tokens_bounds=self.step_tokens.bounds,
            iteration_tokens_bucket_counts=self.step_tokens.cumulative(),
            iteration_tokens_sum=self.step_tokens.total,
            enable_prefix_caching=self.kv.enable_caching,
            max_loras=self.config.max_loras if self.config.enable_lora else 0,
            running_lora_adapters=sorted({r.lora_name for r in self.running if r.lora_name}),
            waiting_lora_adapters=sorted({r.lora_name for r in self.waiting if r.lora_name}),
            encoder_cache_queries=self.encoder.num_queries,
            encoder_cache_hits=self.encoder.num_hits,
            encoder_cache_usage=self.encoder.usage,
        )
