"""Protobuf <-> `splitserve.common.messages` at the gRPC edges, and nowhere else.

Used by the scheduler's gRPC executor (steps out, results in), the worker's Execute stream
(steps in, results out) and the scheduler's service (GenerateRequest in, TokenLogprobs out).
The round-trip tests (`tests/common/test_messages.py`) set every field of every message, so a
field added to a .proto and forgotten here fails there.
"""

from __future__ import annotations

from splitserve.protos import common_pb2, scheduler_pb2, worker_pb2

from . import messages as msg

# ---------------------------------------------------------------------------- common

_SP_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "n",
)
"""The proto3 `optional` scalars of SamplingParams (None when unset)."""


def sampling_params_from_proto(p: common_pb2.SamplingParams) -> msg.SamplingParams:
    sp = msg.SamplingParams(
        stop_token_ids=list(p.stop_token_ids),
        logit_bias=dict(p.logit_bias),
        stop=list(p.stop),
        allowed_token_ids=list(p.allowed_token_ids),
        bad_words_token_ids=[list(s.token_ids) for s in p.bad_words_token_ids],
    )
    for name in _SP_OPTIONAL:
        if p.HasField(name):
            setattr(sp, name, getattr(p, name))
    return sp


def sampling_params_to_proto(sp: msg.SamplingParams) -> common_pb2.SamplingParams:
    kwargs = {name: v for name in _SP_OPTIONAL if (v := getattr(sp, name)) is not None}
    p = common_pb2.SamplingParams(
        stop_token_ids=sp.stop_token_ids,
        logit_bias=sp.logit_bias,
        stop=sp.stop,
        allowed_token_ids=sp.allowed_token_ids,
        **kwargs,
    )
    for seq in sp.bad_words_token_ids:
        p.bad_words_token_ids.add(token_ids=seq)
    return p


def token_logprobs_from_proto(e: common_pb2.TokenLogprobs) -> msg.TokenLogprobs:
    return msg.TokenLogprobs(
        e.token_id, e.logprob, e.rank, list(e.top_token_ids), list(e.top_logprobs)
    )


def fill_token_logprobs(e: common_pb2.TokenLogprobs, lp: msg.TokenLogprobs) -> None:
    """Write `lp` into the empty message `e` (a repeated field's `add()`)."""
    e.token_id = lp.token_id
    e.logprob = lp.logprob
    e.rank = lp.rank
    e.top_token_ids.extend(lp.top_token_ids)
    e.top_logprobs.extend(lp.top_logprobs)


def token_logprobs_to_proto(lp: msg.TokenLogprobs) -> common_pb2.TokenLogprobs:
    e = common_pb2.TokenLogprobs()
    fill_token_logprobs(e, lp)
    return e


def extend_token_logprobs(field, entries) -> None:
    """Append dataclass `entries` to a repeated TokenLogprobs field (None: an empty entry)."""
    for lp in entries:
        e = field.add()
        if lp is not None:
            fill_token_logprobs(e, lp)


def grammar_spec_from_proto(g: common_pb2.GrammarSpec) -> msg.GrammarSpec:
    return msg.GrammarSpec(g.kind, g.spec, g.backend, g.whitespace_pattern)


def grammar_spec_to_proto(g: msg.GrammarSpec) -> common_pb2.GrammarSpec:
    return common_pb2.GrammarSpec(
        kind=g.kind, spec=g.spec, backend=g.backend, whitespace_pattern=g.whitespace_pattern
    )


def compiled_grammar_from_proto(g: common_pb2.CompiledGrammar) -> msg.CompiledGrammar:
    return msg.CompiledGrammar(g.handle, g.backend, g.compiled)


def compiled_grammar_to_proto(g: msg.CompiledGrammar) -> common_pb2.CompiledGrammar:
    return common_pb2.CompiledGrammar(handle=g.handle, backend=g.backend, compiled=g.compiled)


def _tensor_from_proto(m, name: str) -> msg.TensorData | None:
    if not m.HasField(name):
        return None
    t = getattr(m, name)
    return msg.TensorData(t.dtype, list(t.shape), t.data)


def _tensor_to_proto(field, t: msg.TensorData | None) -> None:
    if t is not None:
        field.SetInParent()  # present even when empty
        field.dtype = t.dtype
        field.shape.extend(t.shape)
        field.data = t.data


def mm_input_from_proto(m: common_pb2.MultiModalInput) -> msg.MultiModalInput:
    return msg.MultiModalInput(
        modality=m.modality,
        pixel_values=_tensor_from_proto(m, "pixel_values"),
        hash=m.hash,
        offset=m.offset,
        length=m.length,
        input_features=_tensor_from_proto(m, "input_features"),
        num_frames=m.num_frames,
        image_size=list(m.image_size),
    )


def mm_input_to_proto(m: msg.MultiModalInput) -> common_pb2.MultiModalInput:
    p = common_pb2.MultiModalInput(
        modality=m.modality,
        hash=m.hash,
        offset=m.offset,
        length=m.length,
        num_frames=m.num_frames,
        image_size=m.image_size,
    )
    _tensor_to_proto(p.pixel_values, m.pixel_values)
    _tensor_to_proto(p.input_features, m.input_features)
    return p


# ---------------------------------------------------------------------------- scheduler


def generate_request_from_proto(r: scheduler_pb2.GenerateRequest) -> msg.GenerateRequest:
    """The scheduler's Generate / Submit edge."""
    return msg.GenerateRequest(
        request_id=r.request_id,
        prompt_token_ids=list(r.prompt_token_ids),
        sampling_params=sampling_params_from_proto(r.sampling_params),
        lora_name=r.lora_name,
        priority=r.priority,
        grammar=grammar_spec_from_proto(r.grammar) if r.HasField("grammar") else None,
        lora_path=r.lora_path,
        cache_salt=r.cache_salt,
        lora_int_id=r.lora_int_id,
        mm_inputs=[mm_input_from_proto(m) for m in r.mm_inputs],
        pooling=r.pooling,
        dimensions=r.dimensions if r.HasField("dimensions") else None,
        normalize=r.normalize if r.HasField("normalize") else None,
        compiled_grammar=(
            compiled_grammar_from_proto(r.compiled_grammar)
            if r.HasField("compiled_grammar")
            else None
        ),
        heartbeat_interval_s=r.heartbeat_interval_s,
    )


def generate_request_to_proto(r: msg.GenerateRequest) -> scheduler_pb2.GenerateRequest:
    """The reverse (a client building the wire form; the round-trip tests)."""
    p = scheduler_pb2.GenerateRequest(
        request_id=r.request_id,
        prompt_token_ids=r.prompt_token_ids,
        lora_name=r.lora_name,
        priority=r.priority,
        lora_path=r.lora_path,
        cache_salt=r.cache_salt,
        lora_int_id=r.lora_int_id,
        mm_inputs=[mm_input_to_proto(m) for m in r.mm_inputs],
        pooling=r.pooling,
        heartbeat_interval_s=r.heartbeat_interval_s,
    )
    if r.sampling_params != msg.SamplingParams():  # unset and empty mean the same
        p.sampling_params.CopyFrom(sampling_params_to_proto(r.sampling_params))
    if r.grammar is not None:
        p.grammar.CopyFrom(grammar_spec_to_proto(r.grammar))
    if r.dimensions is not None:
        p.dimensions = r.dimensions
    if r.normalize is not None:
        p.normalize = r.normalize
    if r.compiled_grammar is not None:
        p.compiled_grammar.CopyFrom(compiled_grammar_to_proto(r.compiled_grammar))
    return p


# ---------------------------------------------------------------------------- worker steps


def _new_request_to_proto(m: worker_pb2.NewRequest, r: msg.NewRequest) -> None:
    m.request_id = r.request_id
    m.token_ids.extend(r.token_ids)
    m.sampling_params.CopyFrom(sampling_params_to_proto(r.sampling_params))
    m.block_ids.extend(r.block_ids)
    m.num_computed_tokens = r.num_computed_tokens
    m.num_prompt_tokens = r.num_prompt_tokens
    if r.grammar is not None:
        m.grammar.CopyFrom(compiled_grammar_to_proto(r.grammar))
    if r.grammar_spec is not None:
        m.grammar_spec.CopyFrom(grammar_spec_to_proto(r.grammar_spec))
    if r.trace_context:
        m.trace_context.update(r.trace_context)
    m.lora_name = r.lora_name
    m.lora_path = r.lora_path
    m.lora_int_id = r.lora_int_id
    if r.mm_inputs:
        m.mm_inputs.extend(mm_input_to_proto(x) for x in r.mm_inputs)
    if r.state_slot >= 0:
        m.state_slot = r.state_slot
    if r.restore_state_slot >= 0:
        m.restore_state_slot = r.restore_state_slot


def _new_request_from_proto(m: worker_pb2.NewRequest) -> msg.NewRequest:
    return msg.NewRequest(
        request_id=m.request_id,
        token_ids=list(m.token_ids),
        sampling_params=sampling_params_from_proto(m.sampling_params),
        block_ids=list(m.block_ids),
        num_computed_tokens=m.num_computed_tokens,
        num_prompt_tokens=m.num_prompt_tokens,
        grammar=compiled_grammar_from_proto(m.grammar) if m.HasField("grammar") else None,
        grammar_spec=(
            grammar_spec_from_proto(m.grammar_spec) if m.HasField("grammar_spec") else None
        ),
        trace_context=dict(m.trace_context),
        lora_name=m.lora_name,
        lora_path=m.lora_path,
        lora_int_id=m.lora_int_id,
        mm_inputs=[mm_input_from_proto(x) for x in m.mm_inputs],
        state_slot=m.state_slot if m.HasField("state_slot") else -1,
        restore_state_slot=m.restore_state_slot if m.HasField("restore_state_slot") else -1,
    )


def step_request_to_proto(step: msg.StepRequest) -> worker_pb2.StepRequest:
    """The scheduler's edge (GrpcExecutor.submit)."""
    p = worker_pb2.StepRequest(
        step_id=step.step_id,
        num_scheduled_tokens=step.num_scheduled_tokens,
        finished_request_ids=step.finished_request_ids,
        encoder_evictions=step.encoder_evictions,
        rebalance_experts=step.rebalance_experts,
    )
    for r in step.new_requests:
        _new_request_to_proto(p.new_requests.add(), r)
    for name, int_id in step.lora_evictions:
        p.lora_evictions.add(lora_name=name, lora_int_id=int_id)
    for (name, int_id), slot in step.lora_slots:
        p.lora_slots.add(adapter=worker_pb2.LoRAKey(lora_name=name, lora_int_id=int_id), slot=slot)
    for rid, slot in step.state_snapshots:
        p.state_snapshots.add(request_id=rid, slot=slot)
    # NOTE: per running request per step, so the cheapest form: attribute sets, and the
    # (mostly empty) lists only when they hold something (4x faster than add(**fields)).
    add = p.cached_requests.add
    for c in step.cached_requests:
        m = add()
        m.request_id = c.request_id
        m.num_computed_tokens = c.num_computed_tokens
        if c.new_block_ids:
            m.new_block_ids.extend(c.new_block_ids)
        if c.new_token_ids:
            m.new_token_ids.extend(c.new_token_ids)
    return p


def step_request_from_proto(p: worker_pb2.StepRequest) -> msg.StepRequest:
    """The worker's edge (its Execute stream)."""
    CachedRequest = msg.CachedRequest
    cached = []
    for c in p.cached_requests:
        # NOTE: per running request per step: copy the (mostly empty) lists only when they
        # hold something (half the cost of list() on each).
        blocks, tokens = c.new_block_ids, c.new_token_ids
        cached.append(
            CachedRequest(
                c.request_id,
                list(blocks) if blocks else [],
                c.num_computed_tokens,
                list(tokens) if tokens else [],
            )
        )
    return msg.StepRequest(
        step_id=p.step_id,
        new_requests=[_new_request_from_proto(m) for m in p.new_requests],
        cached_requests=cached,
        num_scheduled_tokens=dict(p.num_scheduled_tokens),
        finished_request_ids=list(p.finished_request_ids),
        lora_evictions=[(k.lora_name, k.lora_int_id) for k in p.lora_evictions],
        lora_slots=[((s.adapter.lora_name, s.adapter.lora_int_id), s.slot) for s in p.lora_slots],
        encoder_evictions=list(p.encoder_evictions),
        state_snapshots=[(s.request_id, s.slot) for s in p.state_snapshots],
        rebalance_experts=p.rebalance_experts,
    )


def step_result_to_proto(r: msg.StepResult) -> worker_pb2.StepResult:
    """The worker's edge (its Execute stream)."""
    p = worker_pb2.StepResult(
        step_id=r.step_id,
        request_ids=r.request_ids,
        token_ids=r.token_ids,
        errors=r.errors,
        grammar_terminated_ids=r.grammar_terminated_ids,
        deferred_request_ids=r.deferred_request_ids,
    )
    if r.logprobs:
        extend_token_logprobs(p.logprobs, r.logprobs)
    for rid, entries in r.prompt_logprobs.items():
        extend_token_logprobs(p.prompt_logprobs[rid].entries, entries)
    add = p.pooled.add
    for pooled in r.pooled:
        add(request_id=pooled.request_id, data=pooled.data)
    if r.eplb is not None:
        e = r.eplb
        p.eplb.num_rebalances = e.num_rebalances
        p.eplb.balancedness_before = e.balancedness_before
        p.eplb.balancedness_after = e.balancedness_after
        p.eplb.layers_moved = e.layers_moved
        p.eplb.experts_received = e.experts_received
    return p


def step_result_from_proto(p: worker_pb2.StepResult) -> msg.StepResult:
    """The scheduler's edge (GrpcExecutor.get_result)."""
    r = msg.StepResult(
        step_id=p.step_id,
        request_ids=list(p.request_ids),
        token_ids=list(p.token_ids),
        errors=dict(p.errors),
        grammar_terminated_ids=list(p.grammar_terminated_ids),
        deferred_request_ids=list(p.deferred_request_ids),
    )
    if p.logprobs:
        # NOTE: an empty entry (rank 0: a real one is 1-based) is a request that did not ask.
        r.logprobs = [token_logprobs_from_proto(e) if e.rank else None for e in p.logprobs]
    if p.prompt_logprobs:
        r.prompt_logprobs = {
            rid: [token_logprobs_from_proto(e) for e in v.entries]
            for rid, v in p.prompt_logprobs.items()
        }
    if p.pooled:
        r.pooled = [msg.PooledOutput(x.request_id, list(x.data)) for x in p.pooled]
    if p.HasField("eplb"):
        e = p.eplb
        r.eplb = msg.EplbReport(
            e.num_rebalances,
            e.balancedness_before,
            e.balancedness_after,
            e.layers_moved,
            e.experts_received,
        )
    return r
