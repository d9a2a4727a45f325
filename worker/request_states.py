"""The worker's per-request state, added and removed in one place.

A request's state is spread over several holders: its row in the input batch, its LoRA
adapter, its images or audio (first rank) or cross-attention slot (Whisper), its grammar
matcher (sampling rank), its pooling state, its recurrent-state slot (restored from a
prefix-cache snapshot on a hit; the slot itself is the scheduler's, so nothing is freed here). `update` applies a step message's changes to all
of them in order (ended requests first, then the scheduler's evictions, new requests, adapter
placements and the running requests' deltas); `forget` drops a request from every holder, so a
new holder cannot be forgotten in one path and kept in another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitserve.common import messages as msg

if TYPE_CHECKING:
    from splitserve.worker.model_runner import ModelRunner


class RequestStates:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        """The runner whose holders (batch, lora, mm, cross, structured, pooler) this updates;
        read at each call, as the runner may replace them (the batch, once the cache is sized)."""

    def update(self, step: msg.StepRequest, errors: dict[str, str]) -> None:
        """Apply a step's request changes: ended requests, evictions, new requests, placements
        and the running requests' deltas; a request that fails gets its error in `errors`."""
        r = self.runner
        batch = r.batch
        structured = r.structured
        for rid in step.finished_request_ids:
            self.forget(rid)
        if r.lora is not None:
            r.lora.evict(step.lora_evictions)
        if r.mm is not None and step.encoder_evictions:
            r.mm.evict(step.encoder_evictions)
        for req in step.new_requests:
            error = self._add_lora(req)  # first: the row's vocabulary limit is its adapter's
            error = error or batch.add(req, r.lora and r.lora.vocab_limit(req.request_id))
            error = error or self._add_images(req)
            if not error and structured is not None:
                error = self._add_grammar(req)
            if not error and r.state_cache is not None and req.num_computed_tokens:
                # A prefix-cache hit: start from the snapshot of the state at the hit's end.
                r.state_cache.copy(req.restore_state_slot, req.state_slot)
            if error:
                errors[req.request_id] = error
                self.forget(req.request_id)  # drops the adapter reference too
        if r.lora is not None:
            r.lora.place(step.lora_slots)
        for cached in step.cached_requests:
            row = batch.rows.get(cached.request_id)
            if row is None:
                continue  # reported if it is scheduled
            error = batch.append_blocks(row, cached.new_block_ids) or self._append_tokens(
                row, cached.new_token_ids
            )
            if error:
                errors[cached.request_id] = error
                self.forget(cached.request_id)
                continue
            computed = cached.num_computed_tokens
            if cached.request_id in r.deferred_ids:
                # NOTE: a step planned before the scheduler saw the deferral counts the
                # deferred position as computed; this rank computes it again.
                computed = min(computed, int(batch.num_computed[row]))
            batch.num_computed[row] = computed

    def _append_tokens(self, row: int, token_ids) -> str:
        """Take the tokens the last rank sampled (pipeline parallelism); the last rank
        already appended them when it sampled. Returns an error, or "" when they fit."""
        r = self.runner
        if r.is_last or not token_ids:
            return ""
        batch = r.batch
        n, k = int(batch.num_tokens[row]), len(token_ids)
        if n + k > batch.token_ids.shape[1]:
            return f"{n + k} tokens exceed the context length {batch.token_ids.shape[1]}"
        batch.token_ids[row, n : n + k] = token_ids
        batch.num_tokens[row] = n + k
        return ""

    def _add_images(self, req: msg.NewRequest) -> str | None:
        """Keep the request's images and audio (first rank: it embeds the tokens); an error
        message."""
        r = self.runner
        if r.mm is not None:
            return r.mm.add(req)
        if r.cross is not None:
            return r.cross.add(req)
        if req.mm_inputs and r.is_first:
            return f"this model does not take {req.mm_inputs[0].modality or 'multimodal'} inputs"
        return None

    def _add_grammar(self, req: msg.NewRequest) -> str | None:
        """Give a constrained request its matcher, replaying outputs kept across a preemption."""
        r = self.runner
        if req.grammar is not None:
            grammar = req.grammar
        elif req.grammar_spec is not None:
            grammar = req.grammar_spec  # a direct caller's constraint: compiled here
        else:
            r.structured.remove(req.request_id)  # a reused id must not keep an old matcher
            return None
        num_prompt = req.num_prompt_tokens if req.num_prompt_tokens > 0 else len(req.token_ids)
        return r.structured.add(req.request_id, grammar, list(req.token_ids[num_prompt:]))

    def _add_lora(self, req: msg.NewRequest) -> str | None:
        """Load the request's adapter (if it names one); an error message, or None."""
        r = self.runner
        if r.lora is not None:
            r.lora.remove_request(req.request_id)  # a reused id must not keep an old adapter
        if not req.lora_name:
            return None
        if r.lora is None:
            return f"LoRA adapter {req.lora_name!r} asked for, but this worker runs without --enable-lora"
        return r.lora.add_request(req.request_id, req.lora_name, req.lora_path, req.lora_int_id)

    def forget(self, request_id: str) -> None:
        """Drop everything the worker holds for the request."""
        r = self.runner
        r.batch.remove(request_id)
        if r.pooler is not None:
            r.pooler.remove(request_id)
        r.deferred_ids.discard(request_id)
        if r.mm is not None:
            r.mm.remove(request_id)
        if r.cross is not None:
            r.cross.remove(request_id)
        if r.lora is not None:
            r.lora.remove_request(request_id)
        if r.structured is not None:
            r.structured.remove(request_id)
