"""ModelRunner: one pipeline rank's model, KV cache and per-request state; runs scheduler steps.

Step semantics (`execute`): forget `finished_request_ids`; add `new_requests`; extend the block
tables of `cached_requests` and take their `num_computed_tokens`; compute
token_ids[num_computed : num_computed + n] for every scheduled request; a request whose
computed tokens then cover all its known tokens samples one token, appended to its token ids
(so the next decode step's input is already there, which is what lets the scheduler run one
step ahead). Only the positions that are sampled, plus every position of prompt-logprobs
requests, go through lm_head. A constrained request whose grammar is still compiling does not
sample: it is reported in `deferred_request_ids`, its last position counts as not computed, and
a later step computes that position again (the scheduler takes it off num_computed_tokens; a
step planned before the scheduler saw the deferral is corrected here).

Steps and results are `splitserve.common.messages` dataclasses: the worker's gRPC service
converts at its edge, the in-process engine hands them over as they are.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from splitserve.common import engine_config
from splitserve.common import messages as msg
from splitserve.common.lora import check_lora_fields
from splitserve.protos import common_pb2, worker_pb2
from splitserve.worker import cache_spec, tp_channel
from splitserve.worker import kv_cache as kv
from splitserve.worker.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    forward_context,
    get_attention_backend,
)
from splitserve.worker.config import WorkerConfig
from splitserve.worker.cross_attention import CrossAttentionSlots
from splitserve.worker.cuda_graphs import DecodeGraphs, capture_sizes, measure_capture_memory
from splitserve.worker.input_batch import InputBatch
from splitserve.worker.lora import LoRAManager
from splitserve.worker.model_loader import load_model
from splitserve.worker.multimodal import MultiModalInputs
from splitserve.worker.pipeline import IntermediateTensors, step_layout
from splitserve.worker.pooler import setup_runner
from splitserve.worker.request_states import RequestStates
from splitserve.worker.sampler import Sampler, compute_logprobs
from splitserve.worker.state_cache import StateCache, new_state_cache
from splitserve.worker.step_plan import GrammarMasks, StepPlan
from splitserve.worker.structured_output import StructuredOutputs

logger = logging.getLogger(__name__)


class ModelRunner:
    """Loads the model slice at construction; `initialize_cache` must run before `execute`."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine_label = f"worker rank {config.rank}"
        # NOTE: enable_lora, lora_extra_vocab_size fixed: LoRA wraps layers while loading.
        self.engine = engine_config.engine_values(
            config,
            self.engine_label,
            also_fixed=frozenset({"enable_lora", "lora_extra_vocab_size"}),
        )
        """This rank's own engine fields (its flags), before it takes any of the scheduler's."""
        self._init_model()
        self._init_sampling()
        self.kv_cache: kv.KVCache | None = None
        self.state_cache: StateCache | None = None
        """Recurrent states (models with state-space layers), one per scheduler slot."""
        self.batch: InputBatch | None = None
        self.block_size = 0
        self.graphs: DecodeGraphs | None = None
        self.last_layout = 0
        """`step_layout` of the last step run (pipeline ranks compare it)."""
        self.states = RequestStates(self)
        """Adds and removes each request's state in every holder (`request_states`)."""

    def _init_model(self) -> None:
        loaded = load_model(self.config)
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.vocab_size
        self.max_model_len = loaded.max_model_len
        self.is_first = self.config.is_first_rank
        self.is_last = self.config.is_last_rank
        self.samples = self.is_last and self.config.tp_rank == 0
        """Whether this rank samples: the last stage's driver (its tensor-parallel peers
        compute the logits with it, then take the sampled tokens from it: `tp_channel`)."""
        self.backend = get_attention_backend(self.config.attention_backend, self.device)
        self.lora = (
            LoRAManager(self.config, self.model, self.device, self.dtype)
            if self.config.enable_lora
            else None
        )
        self.logits_width = self.vocab_size if self.lora is None else self.lora.logits_width
        """Columns of the sampled logits: the vocabulary plus --lora-extra-vocab-size."""
        self.mm = (
            MultiModalInputs(self.model, self.device)
            if getattr(self.model, "supports_images", False)
            or getattr(self.model, "supports_audio", False)
            else None
        )
        """Images and audio of the live requests (models that take them)."""
        self.cross = CrossAttentionSlots.fit(None, self.model, self.config, self.dtype, self.device)
        """Encoder-decoder models: the encoder outputs' cross-attention K/V per request (one
        slot per max_num_seqs, held before describe() measures memory: cross_attention.py)."""
        # --runner: a pooling runner pools on the last rank instead of sampling.
        self.runner, self.pooler, self.runner_info = setup_runner(
            self.config, self.loaded, self.is_last
        )
        self.eplb = None
        """EPLB over this stage's MoE layers (--enable-eplb), driven by the scheduler's steps."""
        if self.config.eplb is not None:
            from splitserve.worker.eplb import EplbState

            self.eplb = EplbState.for_stage(self.model, self.config.eplb, self.loaded.hf_config)

    def _init_sampling(self) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.config.seed)
        self.sampler = Sampler(generator)
        self.structured = (
            StructuredOutputs(
                self._load_tokenizer,
                self.vocab_size,
                self.eos_token_ids,
                default_backend=self.config.guided_decoding_backend,
            )
            if self.samples
            else None
        )
        self.deferred_ids: set[str] = set()
        """Requests that did not sample at their sampling position (grammar compiling)."""

    def _load_tokenizer(self):
        """The HF tokenizer the grammar matchers need (first constrained request only)."""
        from transformers import AutoTokenizer

        from splitserve.common.model_path import resolve_model_path

        source = self.config.tokenizer or self.config.model
        return AutoTokenizer.from_pretrained(str(resolve_model_path(source, self.config.revision)))

    # ------------------------------------------------------------------ setup RPCs

    def describe(
        self, block_size: int, engine: common_pb2.EngineConfig | None = None
    ) -> worker_pb2.DescribeResponse:
        """Model facts and the KV memory this rank can give, for `block_size`, after taking
        the scheduler's `engine` fields this rank left at their defaults (the memory profile
        runs with them). Raises EngineConfigConflict on a field both fix differently."""
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._agree_engine(engine)
        self.cross = CrossAttentionSlots.fit(  # max_num_seqs may be the scheduler's now
            self.cross, self.model, self.config, self.dtype, self.device
        )
        specs = cache_spec.layer_cache_specs(self.model, block_size, self.dtype)
        if self.kv_cache is not None:
            available = self.kv_cache.nbytes + getattr(self.state_cache, "nbytes", 0)
        elif self.device.type == "cuda":
            available = kv.available_kv_bytes(
                self.config,
                self.device,
                self._profile_peak_memory,
                reserved=self._graph_memory(block_size)
                + (self.lora.extra_vocab_bytes() if self.lora else 0),
            )
        else:
            available = kv.available_kv_bytes(self.config, self.device)
        return worker_pb2.DescribeResponse(
            rank=self.config.rank,
            world_size=self.config.pipeline_parallel_size,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            bytes_per_block=cache_spec.bytes_per_block(specs),
            available_kv_bytes=available,
            model=self.config.model,
            sampling_defaults=self.loaded.sampling_defaults.to_proto(),
            runner_info=self.runner_info,
            engine=engine_config.to_proto(
                engine_config.engine_values(self.config, self.engine_label).all_fixed()
            ),
            cache_specs=[s.to_proto() for s in specs],
            eplb_step_interval=self.config.eplb.step_interval if self.config.eplb else 0,
        )

    def _agree_engine(self, engine: common_pb2.EngineConfig | None) -> None:
        """Take the scheduler's fixed engine fields where this rank has its defaults."""
        own = self.engine
        if self.kv_cache is not None:
            # In use: the cache, the batch and the profile were sized with the current values.
            own = engine_config.engine_values(self.config, self.engine_label).all_fixed()
        peer = engine_config.EngineValues({}, frozenset(), {})
        if engine is not None:
            peer = engine_config.from_proto(engine, "scheduler")
        agreed = engine_config.agree(peer, own)
        limit = self.loaded.max_model_len
        if agreed.values["max_model_len"] is not None and agreed.values["max_model_len"] > limit:
            raise engine_config.EngineConfigConflict(
                f"max_model_len: {agreed.sources['max_model_len']} "
                f"{agreed.values['max_model_len']}, {own.sources['max_model_len']} {limit} "
                "(the model's context length, or this rank's --max-model-len)"
            )
        engine_config.adopt(self.config, agreed)
        check_lora_fields(self.config)  # --max-cpu-loras against a max_loras taken just now
        self.max_model_len = self.config.max_model_len or limit

    def initialize_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0) -> float:
        """Allocate the KV cache and recurrent states, warm up with a dummy step; seconds spent."""
        start = time.perf_counter()
        self.graphs = None  # captured against the old cache
        for cache in (self.kv_cache, self.state_cache):
            if cache is not None:
                cache.unbind()
        self.kv_cache = kv.KVCache(
            self.model, num_blocks, block_size, self.dtype, self.device, self.backend.new_kv_cache
        )
        self.state_cache = new_state_cache(self.model, num_state_slots, self.dtype, self.device)
        self.block_size = block_size
        self.batch = InputBatch(
            self.max_model_len,
            block_size,
            self.logits_width,
            num_blocks,
            self.device,
            initial_rows=min(self.config.max_num_seqs, 64),
            max_logprobs=min(self.config.max_logprobs, self.vocab_size),
            num_state_slots=self.state_cache.num_slots if self.state_cache is not None else 0,
        )
        self._warm_up()
        self._capture_graphs()
        if self.eplb is not None:  # the profile and warm-up routed no real token
            self.eplb.counter.reset()
        seconds = time.perf_counter() - start
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), ready in %.2fs",
            num_blocks,
            block_size,
            self.kv_cache.nbytes / 2**20,
            seconds,
        )
        return seconds

    def _warm_up(self) -> None:
        """Run a prefill and a decode step of a throwaway request through every path."""
        capacity = self.kv_cache.num_blocks * self.block_size
        length = max(1, min(16, capacity - 1, self.max_model_len - 1))
        blocks = list(range(math.ceil((length + 1) / self.block_size)))
        req = msg.NewRequest(
            request_id="__warmup__",
            token_ids=[0] * length,
            block_ids=blocks,
            num_prompt_tokens=length,
            sampling_params=msg.SamplingParams(temperature=0),
            mm_inputs=self.cross.warm_up_inputs(length) if self.cross is not None else [],
            state_slot=0 if self.state_cache is not None else -1,
        )
        steps = [
            msg.StepRequest(
                step_id=-1, new_requests=[req], num_scheduled_tokens={"__warmup__": length}
            ),
            msg.StepRequest(step_id=-1, num_scheduled_tokens={"__warmup__": 1}),
        ]
        if self.runner == "pooling":
            steps = steps[:1]  # prompt-only: a pooling request never decodes
        for i, step in enumerate(steps):
            if not self.is_last and i == 1:
                self.record_sampled(["__warmup__"], [0])
            self.execute(step, self._dummy_intermediate(length if i == 0 else 1))
        self._forget("__warmup__")

    # ------------------------------------------------------------------ CUDA graphs

    def graph_sizes(self) -> list[int]:
        """Decode batch sizes to capture; empty unless graphs run here: CUDA, no
        enforce_eager, no LoRA, a graph-safe model, and the triton attention backend."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.runner == "pooling":
            return []  # NOTE: a pooling runner only prefills: decode graphs would never run
        if self.config.tensor_parallel_size > 1:
            logger.info("CUDA graphs are not captured with tensor parallelism; decoding eagerly")
            return []
        if self.lora is not None:
            logger.info("CUDA graphs are not captured with --enable-lora; decoding eagerly")
            return []
        if not getattr(self.model, "supports_cuda_graphs", True):
            logger.info(
                "CUDA graphs are not captured for %s (its MoE layers run eagerly); "
                "decoding eagerly",
                type(self.model).__name__,
            )
            return []
        if self.backend.name != "triton":
            logger.info("CUDA graphs need the triton attention backend; decoding eagerly")
            return []
        return capture_sizes(
            self.config.max_num_seqs,
            self.config.cuda_graph_sizes,
            self.config.max_cudagraph_capture_size,
        )

    def make_decode_graphs(self, sizes: list[int], block_size: int) -> DecodeGraphs:
        """Decode graphs over this rank's model, not yet captured (uncaptured, they run the
        padded batch eagerly: the same rows a graph would compute)."""
        return DecodeGraphs(
            self.model,
            self.backend,
            sizes,
            max_seq_len=min(self.config.max_seq_len_to_capture, self.max_model_len),
            block_size=block_size,
            hidden_size=self.loaded.text_config.hidden_size,
            dtype=self.dtype,
            device=self.device,
            is_first=self.is_first,
            is_last=self.is_last,
        )

    def _capture_graphs(self) -> None:
        sizes = self.graph_sizes()
        if not sizes:
            return
        start, before = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        graphs = self.make_decode_graphs(sizes, self.block_size)
        graphs.capture()
        self.graphs = graphs
        logger.info(
            "CUDA graphs: %d decode batch sizes up to %d, contexts up to %d, %.1f MiB, %.1fs",
            len(sizes),
            sizes[-1],
            graphs.max_seq_len,
            (torch.cuda.memory_reserved(self.device) - before) / 2**20,
            time.perf_counter() - start,
        )

    def _graph_memory(self, block_size: int) -> int:
        """Bytes the decode graphs will keep, for the KV budget: a trial capture of the
        largest size on a one-block cache (the smaller graphs reuse its memory pool), plus the
        output rows each further graph keeps."""
        sizes = self.graph_sizes()
        if not sizes:
            return 0
        trial = kv.KVCache(self.model, 1, block_size, self.dtype, self.device)
        try:
            used = measure_capture_memory(
                self.make_decode_graphs(sizes[-1:], block_size), self.device
            )
        finally:
            trial.unbind()
            del trial
            gc.collect()  # release the trial graphs and their memory pool before measuring on
            torch.cuda.empty_cache()
        item = torch.empty((), dtype=self.dtype).element_size()
        per_row = self.loaded.text_config.hidden_size * item * (1 if self.is_last else 2)
        reserved = used + sum(sizes[:-1]) * per_row
        logger.info("CUDA graphs will hold about %.1f MiB", reserved / 2**20)
        return reserved

    def _dummy_intermediate(self, num_tokens: int) -> IntermediateTensors | None:
        if self.is_first:
            return None
        hidden = self.loaded.text_config.hidden_size
        zeros = torch.zeros(num_tokens, hidden, dtype=self.dtype, device=self.device)
        return IntermediateTensors(zeros, zeros.clone())

    def _profile_peak_memory(self) -> int:
        """Peak CUDA memory (weights included) of the largest step, before any KV cache."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_forward()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    @torch.inference_mode()
    def profile_forward(self) -> None:
        """Run the largest step the scheduler may send (max_num_batched_tokens prompt tokens,
        lm_head and log-softmax over max_num_seqs rows) without a KV cache."""
        num_tokens = min(
            self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.max_model_len
        # Sequences no longer than the context, each all new.
        lens = [self.max_model_len] * (num_tokens // self.max_model_len)
        lens += [num_tokens % self.max_model_len] if num_tokens % self.max_model_len else []
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        meta = AttentionMetadata(
            num_tokens,
            None,
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            query_start_loc=torch.from_numpy(cu).to(self.device),
            max_query_len=max(lens),
            max_seq_len=max(lens),
        )
        cross = self.cross.profile(cu.tolist()) if self.cross is not None else nullcontext()
        # No cache exists yet, and the kernels read keys from it: profile with the torch path.
        with forward_context(TorchAttentionBackend(), meta), cross:
            out = self.model(input_ids, positions, self._dummy_intermediate(num_tokens))
        if self.is_last:
            rows = min(self.config.max_num_seqs, num_tokens)
            logits = self.model.compute_logits(out[:rows])
            if logits is None:  # a tensor-parallel peer: the driver holds the logits
                return
            if self.logits_width > self.vocab_size:
                logits = self.lora.extend_logits(out[:rows], logits, [None] * rows)
            logits.float().log_softmax(-1)

    # ------------------------------------------------------------------ steps

    @torch.inference_mode()
    def execute(
        self, step: msg.StepRequest, intermediate: IntermediateTensors | None = None
    ) -> msg.StepResult | IntermediateTensors:
        """Run one scheduler step. The last rank returns a StepResult; the others return the
        tensors for the next rank (and must later be told the sampled tokens, see
        `record_sampled`). A step marked `rebalance_experts` first re-places the experts
        (EPLB: every rank of the stage at the same point, before anything else of the step)."""
        if self.eplb is None:
            if step.rebalance_experts and self.config.eplb is None:
                raise RuntimeError("the scheduler asked for an expert rebalance, EPLB is off")
            return self._execute(step, intermediate)
        report = self.eplb.rebalance_report() if step.rebalance_experts else None
        out = self._execute(step, intermediate)
        if report is not None and isinstance(out, msg.StepResult):
            out.eplb = report
        return out

    def _execute(
        self, step: msg.StepRequest, intermediate: IntermediateTensors | None
    ) -> msg.StepResult | IntermediateTensors:
        batch = self.batch
        if batch is None:
            raise RuntimeError("initialize_cache must run before execute")
        errors: dict[str, str] = {}
        self._update_states(step, errors)
        if self.is_last and self.config.tensor_parallel_size > 1:
            tp_channel.share_refusals(self, errors)
        plan = self._plan(step, errors)
        self.last_layout = 0 if plan is None else step_layout(plan.rows, plan.ends)
        if not self.is_first:
            self._check_intermediate(step, plan, intermediate)
        if plan is None:
            if not self.is_last:
                return self._empty_intermediate()
            return msg.StepResult(step_id=step.step_id, errors=errors)
        masks = self._start_masks(plan)
        out = self._forward(plan, intermediate)
        if self.eplb is not None:
            self.eplb.end_step()
        if step.state_snapshots and self.state_cache is not None:
            self.state_cache.take_snapshots(step.state_snapshots, batch.rows, batch.state_slot)
        batch.num_computed[plan.rows] = plan.ends
        if self.mm is not None and len(self.mm):
            self.mm.release_computed([batch.req_ids[r] for r in plan.rows.tolist()], plan.ends)
        if not self.is_last:
            return out
        if self.pooler is not None:
            return self.pooler.step_result(
                step.step_id,
                [batch.req_ids[r] for r in plan.rows.tolist()],
                out,
                plan.counts,
                plan.ends - plan.counts,
                plan.ends == batch.num_tokens[plan.rows],
                errors,
            )
        if plan.logits_indices.numel() == 0:  # only partial prefill chunks this step
            return msg.StepResult(step_id=step.step_id, errors=errors)
        hidden = out.index_select(0, plan.logits_indices)
        logits = self.model.compute_logits(hidden)
        if logits is None:  # a tensor-parallel peer: the driver samples
            tp_channel.share_samples(self, plan, None)
            return msg.StepResult(step_id=step.step_id, errors=errors)
        if self.logits_width > self.vocab_size:
            req_ids = plan.logits_request_ids(self.batch.req_ids)
            logits = self.lora.extend_logits(hidden, logits, req_ids)
        result = self._sample(step, plan, logits, errors, masks)
        if self.config.tensor_parallel_size > 1:
            tp_channel.share_samples(self, plan, result)
        return result

    def _start_masks(self, plan: StepPlan) -> GrammarMasks | None:
        """Start filling the grammar bitmasks of the sampling rows (on a helper thread, so it
        overlaps the forward pass); None when no sampling row is constrained."""
        structured = self.structured
        if structured is None or len(structured) == 0 or plan.sample_rows.size == 0:
            return None
        req_ids = self.batch.req_ids
        rids = [req_ids[r] for r in plan.sample_rows.tolist()]
        # NOTE: a deferred position is computed again, which would advance a recurrent state
        # twice: with recurrent layers the step waits for the compile instead (in `fill`).
        deferred = structured.compiling(rids) if self.state_cache is None else []
        if deferred:
            skip = set(deferred)
            rids = [rid for i, rid in enumerate(rids) if i not in skip]
        positions = structured.active(rids)
        if not positions and not deferred:
            return None
        future = structured.fill_async(rids, positions) if positions else None
        return GrammarMasks(rids, positions, future, deferred)

    def _forward(
        self, plan: StepPlan, intermediate: IntermediateTensors | None
    ) -> torch.Tensor | IntermediateTensors:
        """The model over the step: a graph replay for decode-only steps that fit one."""
        attn, graphs = plan.attn, self.graphs
        if self.cross is not None:
            rows = [self.batch.req_ids[r] for r in plan.rows.tolist()]
            with forward_context(self.backend, attn), self.cross.run_step(rows, plan.counts):
                return self.model(plan.input_ids, plan.positions, intermediate)
        # NOTE: the LoRA step opens before the image embeddings: they embed the text tokens
        # too, an adapter's added tokens included.
        lora = nullcontext() if self.lora is None else self.lora.step(self.batch.req_ids, plan)
        with lora:
            embeds = self._image_embeddings(plan)
            if (
                embeds is None
                and graphs is not None
                and graphs.can_run(plan.rows.size, attn.max_query_len, attn.max_seq_len)
            ):
                return graphs.run(attn, plan.input_ids, plan.positions, intermediate)
            if embeds is None:
                args, kwargs = (plan.input_ids, plan.positions, intermediate), {}
            else:
                args, kwargs = (None, plan.positions, intermediate), {"inputs_embeds": embeds}
            with forward_context(self.backend, attn):
                return self.model(*args, **kwargs)

    def _image_embeddings(self, plan: StepPlan) -> torch.Tensor | None:
        """The step's input embeddings with image embeddings at image positions; None when
        the step computes no image position."""
        if self.mm is None or not len(self.mm):
            return None
        q = plan.counts
        offsets = np.cumsum(q) - q
        req_ids = [self.batch.req_ids[r] for r in plan.rows.tolist()]
        return self.mm.embeddings(req_ids, plan.ends - q, plan.ends, offsets, plan.input_ids)

    def _check_intermediate(
        self,
        step: msg.StepRequest,
        plan: StepPlan | None,
        intermediate: IntermediateTensors | None,
    ) -> None:
        """The previous rank must have computed exactly this step's tokens."""
        expected = 0 if plan is None else plan.attn.num_tokens
        got = None if intermediate is None else int(intermediate.hidden_states.shape[0])
        if got != expected and not (got is None and expected == 0):
            raise RuntimeError(
                f"step {step.step_id}: this rank plans {expected} tokens but the previous "
                f"pipeline rank sent {got}: the ranks' request states disagree"
            )
        if intermediate is not None and intermediate.layout not in (None, self.last_layout):
            raise RuntimeError(
                f"step {step.step_id}: the previous pipeline rank laid out the batch's rows "
                "differently: the ranks' request states disagree"
            )

    def _empty_intermediate(self) -> IntermediateTensors:
        hidden = self.loaded.text_config.hidden_size
        empty = torch.empty(0, hidden, dtype=self.dtype, device=self.device)
        return IntermediateTensors(empty, empty)

    def record_sampled(self, request_ids: list[str], token_ids: list[int]) -> None:
        """Append tokens sampled by the last rank (non-last ranks keep token ids in step)."""
        batch = self.batch
        for rid, tok in zip(request_ids, token_ids, strict=True):
            row = batch.rows.get(rid)
            if row is not None:
                batch.token_ids[row, batch.num_tokens[row]] = tok
                batch.num_tokens[row] += 1

    def _update_states(self, step: msg.StepRequest, errors: dict[str, str]) -> None:
        self.states.update(step, errors)

    def _forget(self, request_id: str) -> None:
        self.states.forget(request_id)

    def _plan(self, step: msg.StepRequest, errors: dict[str, str]) -> StepPlan | None:
        batch = self.batch
        rows_of = batch.rows
        rows_list: list[int] = []
        counts: list[int] = []
        for rid, n in step.num_scheduled_tokens.items():
            row = rows_of.get(rid)
            if row is None:
                errors.setdefault(rid, f"request {rid!r} is not known to this worker")
            elif n > 0:
                rows_list.append(row)
                counts.append(n)
        if not rows_list:
            return None
        rows = np.array(rows_list, dtype=np.int64)
        q = np.array(counts, dtype=np.int64)
        starts = batch.num_computed[rows].astype(np.int64)
        ends = starts + q
        bad = (
            (ends > batch.num_tokens[rows])
            | (ends > self.max_model_len)
            | ((ends - 1) // self.block_size >= batch.num_blocks[rows])
        )
        if bad.any():
            rows, q, starts, ends = self._drop_bad(rows, q, starts, ends, bad, errors)
            if rows.size == 0:
                return None
        # Decodes first, shortest context first (the attention backend batches decodes of
        # similar length together), then the multi-token queries. NOTE: ties break by row,
        # not by the step's map order, which protobuf does not keep: pipeline ranks must lay
        # out the same tokens in the same order (their rows agree: same adds and removes).
        order = np.lexsort((rows, ends, q != 1))
        rows, q, starts, ends = rows[order], q[order], starts[order], ends[order]
        return self._build(rows, q, starts, ends)

    def _drop_bad(self, rows, q, starts, ends, bad, errors):
        batch = self.batch
        for i in np.flatnonzero(bad).tolist():
            row = int(rows[i])
            rid = batch.req_ids[row]
            errors[rid] = (
                f"cannot compute tokens [{starts[i]}, {ends[i]}): the request has "
                f"{batch.num_tokens[row]} tokens, {batch.num_blocks[row]} blocks of "
                f"{self.block_size}, and max_model_len is {self.max_model_len}"
            )
            self._forget(rid)
        keep = ~bad
        return rows[keep], q[keep], starts[keep], ends[keep]

    def _build(
        self, rows: np.ndarray, q: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> StepPlan:
        batch, bs, device = self.batch, self.block_size, self.device
        cu = np.cumsum(q)
        offsets = cu - q
        num_tokens = int(cu[-1])
        token_rows = np.repeat(rows, q)
        positions = np.arange(num_tokens) + np.repeat(starts - offsets, q)
        input_ids = batch.token_ids[token_rows, positions]
        slots = (
            batch.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        )
        width = math.ceil(int(ends.max()) / bs)
        attn = AttentionMetadata(
            num_tokens,
            torch.from_numpy(slots).to(device),
            seq_lens=torch.from_numpy(ends.astype(np.int32)).to(device),
            query_start_loc=torch.from_numpy(np.concatenate([[0], cu]).astype(np.int32)).to(device),
            block_tables=torch.from_numpy(batch.block_table[rows, :width]).to(device),
            max_query_len=int(q.max()),
            max_seq_len=int(ends.max()),
        )
        if self.state_cache is not None:
            attn.state_slots = torch.from_numpy(batch.state_slot[rows]).to(device)
            attn.has_initial_state = torch.from_numpy(starts > 0).to(device)
        sampling = ends == batch.num_tokens[rows]
        indices = cu[sampling] - 1
        prompt_chunks, targets = self._prompt_logprob_positions(
            rows, starts, ends, offsets, indices.size
        )
        if prompt_chunks:
            indices = np.concatenate([indices, *(t[0] for t in targets)])
        return StepPlan(
            rows=rows,
            ends=ends,
            input_ids=torch.from_numpy(input_ids).to(device),
            positions=torch.from_numpy(positions).to(device),
            attn=attn,
            sample_rows=rows[sampling],
            logits_indices=torch.from_numpy(indices).to(device),
            prompt_logprobs=prompt_chunks,
            prompt_targets=(
                torch.from_numpy(np.concatenate([t[1] for t in targets])).to(device)
                if targets
                else None
            ),
            counts=q,
        )

    def _prompt_logprob_positions(self, rows, starts, ends, offsets, first_index):
        """Per prompt-logprobs chunk: the logits indices and target tokens it needs."""
        batch = self.batch
        chunks: list[tuple[str, int, int, int]] = []
        targets: list[tuple[np.ndarray, np.ndarray]] = []
        wanted = np.flatnonzero(batch.prompt_logprobs[rows] >= 0)
        index = first_index
        for i in wanted.tolist():
            row = int(rows[i])
            start, stop = int(starts[i]), min(int(ends[i]), int(batch.num_prompt[row]) - 1)
            if stop <= start:
                continue
            positions = np.arange(start, stop)
            targets.append((positions - start + offsets[i], batch.token_ids[row, positions + 1]))
            chunks.append(
                (batch.req_ids[row], index, stop - start, int(batch.prompt_logprobs[row]))
            )
            index += stop - start
        return chunks, targets

    def _sample(
        self,
        step: msg.StepRequest,
        plan: StepPlan,
        logits: torch.Tensor,
        errors: dict[str, str],
        masks: GrammarMasks | None = None,
    ) -> msg.StepResult:
        batch = self.batch
        rows = plan.sample_rows
        n = rows.size  # NOTE: the prompt-logprob logits follow the n sampling ones
        sample_logits = logits[:n]
        result = msg.StepResult(step_id=step.step_id, errors=errors)
        if masks is not None and masks.deferred:
            rows, sample_logits = self._defer(result, rows, sample_logits, masks.deferred)
        if rows.size:
            self.deferred_ids.difference_update(batch.req_ids[r] for r in rows.tolist())
            meta = batch.sampling_metadata(rows, self.eos_token_ids)
            if masks is not None and masks.future is not None:
                bitmask, failed = masks.future.result()
                for rid, message in failed.items():
                    result.errors[rid] = message
                    self.structured.remove(rid)
                meta.bitmask = bitmask.to(self.device, non_blocking=True)
                meta.bitmask_rows = torch.tensor(masks.positions, device=self.device)
                meta.bitmask_vocab = self.vocab_size
            sampled, logprobs = self.sampler(sample_logits, meta)
            tokens = sampled.cpu().numpy()
            if masks is not None and masks.future is not None:
                done, rejected = self.structured.accept(
                    masks.request_ids, masks.positions, tokens.tolist()
                )
                result.grammar_terminated_ids.extend(done)
                for rid, message in rejected.items():
                    result.errors[rid] = message
            lengths = batch.num_tokens[rows]
            batch.token_ids[rows, lengths] = tokens
            batch.num_tokens[rows] = lengths + 1
            req_ids = batch.req_ids
            result.request_ids = [req_ids[r] for r in rows.tolist()]
            result.token_ids = tokens.tolist()
            self._add_logprobs(result, rows, logprobs)
        for rid, first, count, top in plan.prompt_logprobs:
            chunk = compute_logprobs(
                logits[first : first + count],
                plan.prompt_targets[first - n : first - n + count].long(),
                top,
            )
            result.prompt_logprobs.setdefault(rid, []).extend(chunk.to_entries([top] * count))
        return result

    def _defer(self, result, rows: np.ndarray, logits: torch.Tensor, deferred: list[int]):
        """Take the `deferred` sampling rows out of this step: their last position counts as
        not computed, so a later step computes it again and samples then."""
        batch = self.batch
        out = rows[deferred]
        batch.num_computed[out] -= 1
        ids = [batch.req_ids[r] for r in out.tolist()]
        self.deferred_ids.update(ids)
        result.deferred_request_ids.extend(ids)
        keep = np.setdiff1d(np.arange(rows.size), deferred)
        return rows[keep], logits[torch.from_numpy(keep).to(logits.device)]

    def _add_logprobs(self, result: msg.StepResult, rows: np.ndarray, logprobs) -> None:
        """One entry per sampled row (None where the request did not ask); none at all when
        no row asked."""
        if logprobs is None:
            return
        num = self.batch.logprobs[rows]
        wanted = np.flatnonzero(num >= 0)
        filled = logprobs.to_entries(num[wanted].tolist())
        entries: list[msg.TokenLogprobs | None] = [None] * rows.size
        for i, entry in zip(wanted.tolist(), filled, strict=True):
            entries[i] = entry
        result.logprobs = entries
