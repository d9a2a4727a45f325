"""Grammar matchers on the sampling rank: one per constrained request, a bitmask every step.

A request's constraint is turned into a matcher when the request arrives: an xgrammar grammar
is compiled for this rank's tokenizer (model vocabulary, EOS ids) and cached by handle; an
llguidance grammar needs no precompute.

What this rank compiles, and why (the tokenizer service already compiled the constraint in the
gateway's Prepare call, to refuse a bad one with a 400 before anything runs):
- The gateway's `CompiledGrammar` carries xgrammar's serialized *Grammar*, not its compiled
  form, and this rank runs the vocabulary precompute (`compile_grammar`) once per handle. The
  compiled form would spare that, but it holds the adaptive token-mask cache: 43 KB against
  the grammar's 4.8 KB for a three-property schema at the demo model's 2,000-token vocabulary
  (xgrammar 0.2.8), and it grows with the vocabulary (it lists token ids per grammar position)
  and the schema, so real vocabularies of 32k-256k tokens make it far larger. It would travel
  gateway -> scheduler -> every NewRequest on the step path, again on each resume after a
  preemption, which this design keeps lean; and it is bound to the TokenizerInfo it was built
  with, while this rank builds its own from the model (vocabulary rows, EOS ids). The
  precompute runs off the step thread and is cached by handle, so a repeated grammar costs
  nothing here. (vLLM likewise never ships compiled grammars between processes.)
- llguidance has no precompute: its matcher is built from the grammar text, nothing to cache
  beyond the text.
- A bare `GrammarSpec` (a direct Generate caller; the scheduler compiles nothing) is checked and
  built here (`uncompiled_grammar`: the service's checks, minus the precompute this rank runs
  anyway) with --guided-decoding-backend for an unnamed backend; a bad one fails its request
  with the service's message. Its handle is the service's, so both forms share the cache.

The xgrammar compile
(up to about a second for the largest schemas) runs on a background thread from the step the
request arrives in; the batch goes on meanwhile. A request that reaches its first sampling
position before its compile is done does not sample: the runner defers it (see
`ModelRunner._sample`) and it samples in a later step; no other row waits. Every step the rows that sample and hold
a live matcher get one packed int32 bitmask row each (bit j of word w allows token 32w + j),
filled on a helper thread while the forward pass runs; after sampling each matcher accepts its
row's token. A matcher that accepts a stop token is terminated: the request is reported as
finished, and any step already planned past that point samples unmasked (the scheduler drops
that token). After a preemption the request comes back as new with its outputs, which are
replayed into a fresh matcher.

NOTE: async scheduling needs nothing special here. The scheduler may plan step N+1 before it
has step N's tokens, but this rank runs steps in order and its matchers accept each sampled
token before the next step starts, so every mask is built from the full output so far.

Requests without a grammar never reach this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from threading import Lock

import torch

from splitserve.common import messages as msg
from splitserve.protos import common_pb2
from splitserve.tokenizer_svc.grammar import (
    GrammarError,
    GrammarTokenizer,
    resolve_spec,
    uncompiled_grammar,
    xgrammar_compiler,
)

logger = logging.getLogger(__name__)

TEST_COMPILE_GATE_ENV = "SPLITSERVE_TEST_GRAMMAR_COMPILE_GATE"
"""TEST HOOK ONLY, never for production: a file path. When set, every background xgrammar
compile of this worker waits until that file exists (at most TEST_COMPILE_GATE_TIMEOUT_S, then
the compile fails), so a test driving real worker processes can hold a compile back for as long
as it likes and release it by creating the file. Read once, in `StructuredOutputs.__init__`."""
TEST_COMPILE_GATE_TIMEOUT_S = 120.0


def _wait_for_test_gate(path: str) -> None:
    """The TEST_COMPILE_GATE_ENV hook: block the compile thread until `path` exists."""
    logger.warning("%s is set: grammar compile held until %s exists", TEST_COMPILE_GATE_ENV, path)
    deadline = time.monotonic() + TEST_COMPILE_GATE_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{TEST_COMPILE_GATE_ENV}: {path} did not appear in time")
        time.sleep(0.02)  # only the compile thread waits; the steps go on


class _XgrammarMatcher:
    __slots__ = ("matcher",)

    def __init__(self, compiled) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def error(self) -> str:
        return ""


class _GuidanceMatcher:
    __slots__ = ("matcher",)

    def __init__(self, tokenizer, grammar: str) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token) and not self.matcher.is_error()

    @property
    def terminated(self) -> bool:
        return self.matcher.is_stopped()

    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


@dataclass(slots=True)
class _Pending:
    """A request whose xgrammar grammar is still compiling."""

    grammar: common_pb2.CompiledGrammar
    future: Future
    replay: list[int]


class StructuredOutputs:
    """The live matchers of one sampling rank, by request id."""

    def __init__(
        self,
        load_tokenizer: Callable[[], object],
        vocab_size: int,
        eos_token_ids: list[int],
        cache_size: int = 256,
        default_backend: str = "auto",
    ) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.words = (vocab_size + 31) // 32
        """int32 words per bitmask row."""
        self.cache_size = cache_size
        self.default_backend = default_backend
        """Backend of a bare GrammarSpec that names none (--guided-decoding-backend)."""
        self._built: OrderedDict[str, common_pb2.CompiledGrammar] = OrderedDict()
        """Bare specs built into their shipped form, by handle (a few KB each)."""
        self._tokenizer: GrammarTokenizer | None = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._xgrammar_compiler = None
        self._xgrammar_batch = None
        self._guidance_executor = None
        self.matchers: dict[str, _XgrammarMatcher | _GuidanceMatcher] = {}
        self._pending: dict[str, _Pending] = {}
        """Requests whose matcher waits for a compile (built before their first mask)."""
        self._compiling: dict[str, Future] = {}
        """Background xgrammar compiles by handle (done ones move to the cache)."""
        self._tokenizer_lock = Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._compile_pool: ThreadPoolExecutor | None = None
        self._buffer = torch.empty(0, self.words, dtype=torch.int32)
        self._test_compile_gate = os.environ.get(TEST_COMPILE_GATE_ENV) or None

    def __len__(self) -> int:
        return len(self.matchers) + len(self._pending)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.matchers or request_id in self._pending

    # ------------------------------------------------------------------ requests

    def add(
        self,
        request_id: str,
        grammar: msg.CompiledGrammar | msg.GrammarSpec,
        replay: list[int],
    ) -> str | None:
        """Create the request's matcher and replay `replay` (outputs kept across a preemption);
        returns an error message instead when that fails. A grammar not compiled yet starts
        compiling in the background; its matcher is built before the request's first mask,
        and an error found then is reported by `fill`. A GrammarSpec is built here first."""
        self.remove(request_id)
        if isinstance(grammar, (msg.GrammarSpec, common_pb2.GrammarSpec)):
            try:
                grammar = self._from_spec(grammar)
            except GrammarError as exc:  # the constraint itself is bad: the service's words
                logger.info("constraint of %s refused: %s", request_id, exc.message)
                return exc.message
        try:
            compiled = self._compiled_or_future(grammar)
        except Exception as exc:  # a bad payload fails this request only
            logger.warning("grammar %s of %s: %s", grammar.handle[:12], request_id, exc)
            return f"cannot build the grammar matcher: {exc}"
        if isinstance(compiled, Future):
            self._pending[request_id] = _Pending(grammar, compiled, list(replay))
            return None
        return self._start(request_id, grammar, compiled, replay)

    def _from_spec(self, spec: common_pb2.GrammarSpec) -> common_pb2.CompiledGrammar:
        """The shipped form of a bare spec, built once per handle (GrammarError if bad)."""
        _, handle = resolve_spec(spec, self.default_backend)
        built = self._built.get(handle)
        if built is None:
            built = uncompiled_grammar(self._grammar_tokenizer(), spec, self.default_backend)
            self._built[handle] = built
            while len(self._built) > self.cache_size:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(handle)
        return built

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self._pending.pop(request_id, None)

    def _start(
        self, request_id: str, grammar: common_pb2.CompiledGrammar, compiled, replay
    ) -> str | None:
        try:
            if grammar.backend == "xgrammar":
                matcher = _XgrammarMatcher(compiled)
            else:
                matcher = _GuidanceMatcher(self._grammar_tokenizer().guidance_tokenizer(), compiled)
        except Exception as exc:  # a bad payload fails this request only
            logger.warning("grammar %s of %s: %s", grammar.handle[:12], request_id, exc)
            return f"cannot build the grammar matcher: {exc}"
        for i, token in enumerate(replay):
            if not matcher.accept(token):
                return (
                    f"output token {token} at position {i} breaks the grammar on replay "
                    f"{matcher.error()}".rstrip()
                )
        self.matchers[request_id] = matcher
        return None

    def _resolve(self, request_id: str) -> str | None:
        """Build the matcher of a pending request, waiting for its compile if need be."""
        pending = self._pending.pop(request_id)
        try:
            compiled = pending.future.result()
        except Exception as exc:
            self._compiling.pop(pending.grammar.handle, None)  # a later request retries
            logger.warning("grammar %s of %s: %s", pending.grammar.handle[:12], request_id, exc)
            return f"cannot build the grammar matcher: {exc}"
        self._cache(pending.grammar.handle, compiled)
        return self._start(request_id, pending.grammar, compiled, pending.replay)

    def _compiled_or_future(self, grammar: common_pb2.CompiledGrammar):
        """The cached compiled grammar, or the Future of its background compile."""
        self._harvest()
        compiled = self._compiled.get(grammar.handle)
        if compiled is not None:
            self._compiled.move_to_end(grammar.handle)
            return compiled
        future = self._compiling.get(grammar.handle)
        if future is not None:
            return future
        text = grammar.compiled.decode()
        if grammar.backend == "guidance":
            self._cache(grammar.handle, text)
            return text
        if grammar.backend != "xgrammar":
            raise ValueError(f"unknown grammar backend {grammar.backend!r}")
        import xgrammar

        # NOTE: parsing the shipped grammar is cheap and stays here, so a bad payload fails
        # the request at once; only the compile against the vocabulary goes to the background.
        parsed = xgrammar.Grammar.deserialize_json(text)
        if self._compile_pool is None:
            self._compile_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        future = self._compile_pool.submit(self._compile_xgrammar, parsed)
        self._compiling[grammar.handle] = future
        return future

    def _compile_xgrammar(self, parsed):
        """On the compile thread (the only one that touches the xgrammar compiler)."""
        if self._test_compile_gate is not None:
            _wait_for_test_gate(self._test_compile_gate)
        if self._xgrammar_compiler is None:
            self._xgrammar_compiler = xgrammar_compiler(self._grammar_tokenizer())
        return self._xgrammar_compiler.compile_grammar(parsed)

    def _harvest(self) -> None:
        """Move finished background compiles into the cache (failed ones are dropped)."""
        for handle, future in list(self._compiling.items()):
            if future.done():
                del self._compiling[handle]
                if future.exception() is None:
                    self._cache(handle, future.result())

    def _cache(self, handle: str, compiled) -> None:
        self._compiling.pop(handle, None)
        self._compiled[handle] = compiled
        self._compiled.move_to_end(handle)
        while len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)

    def _grammar_tokenizer(self) -> GrammarTokenizer:
        with self._tokenizer_lock:  # the compile thread and the step thread both ask
            if self._tokenizer is None:  # loaded on the first constrained request only
                self._tokenizer = GrammarTokenizer(
                    self._load_tokenizer(), self.vocab_size, self.eos_token_ids
                )
            return self._tokenizer

    # ------------------------------------------------------------------ steps

    def compiling(self, request_ids: list[str]) -> list[int]:
        """Positions in `request_ids` whose grammar is still compiling: they cannot sample
        this step (the runner defers them; nothing else waits)."""
        pending = self._pending
        return [
            i
            for i, rid in enumerate(request_ids)
            if (p := pending.get(rid)) is not None and not p.future.done()
        ]

    def active(self, request_ids: list[str]) -> list[int]:
        """Positions in `request_ids` whose matcher wants a mask this step."""
        matchers, pending = self.matchers, self._pending
        return [
            i
            for i, rid in enumerate(request_ids)
            if rid in pending or ((m := matchers.get(rid)) is not None and not m.terminated)
        ]

    def fill(
        self, request_ids: list[str], positions: list[int]
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """Bitmask int32 [len(request_ids), words] with the rows at `positions` filled, and the
        requests whose matcher failed (their rows allow everything; they must be failed)."""
        n = len(request_ids)
        if self._buffer.shape[0] < n:
            rows = max(n, 2 * self._buffer.shape[0])
            self._buffer = torch.empty(rows, self.words, dtype=torch.int32)
        bitmask = self._buffer[:n]
        failed: dict[str, str] = {}
        by_backend: dict[type, list[int]] = {}
        for i in positions:
            rid = request_ids[i]
            if rid in self._pending and (error := self._resolve(rid)) is not None:
                failed[rid] = error
                bitmask[i].fill_(-1)
                continue
            by_backend.setdefault(type(self.matchers[rid]), []).append(i)
        for kind, rows in by_backend.items():
            matchers = [self.matchers[request_ids[i]].matcher for i in rows]
            try:
                self._fill_batch(kind, matchers, rows, bitmask)
            except Exception:  # find the matcher at fault; the others still get their rows
                logger.exception("batched grammar mask failed; filling row by row")
                for i in rows:
                    rid = request_ids[i]
                    try:
                        self.matchers[rid].fill(bitmask, i)
                    except Exception as exc:  # a matcher bug fails its request only
                        failed[rid] = f"the grammar matcher failed: {exc}"
                        bitmask[i].fill_(-1)
        return bitmask, failed

    def _fill_batch(self, kind: type, matchers: list, rows: list[int], bitmask) -> None:
        """One call per backend for all its rows (both backends spread it over threads)."""
        if issubclass(kind, _XgrammarMatcher):
            if self._xgrammar_batch is None:
                import xgrammar

                self._xgrammar_batch = xgrammar.BatchGrammarMatcher()
            self._xgrammar_batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        else:
            import llguidance
            import llguidance.torch

            if self._guidance_executor is None:
                self._guidance_executor = llguidance.LLExecutor()
            llguidance.torch.fill_next_token_bitmask_par(
                self._guidance_executor, list(zip(matchers, rows)), bitmask
            )

    def fill_async(self, request_ids: list[str], positions: list[int]) -> Future:
        """`fill` on a helper thread, so it overlaps the forward pass."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return self._pool.submit(self.fill, request_ids, positions)

    def accept(
        self, request_ids: list[str], positions: list[int], tokens: list[int]
    ) -> tuple[list[str], dict[str, str]]:
        """Advance the matchers at `positions` with their sampled token; returns the ids whose
        grammar terminated and the errors (a token the grammar rejects) by id."""
        terminated: list[str] = []
        errors: dict[str, str] = {}
        for i in positions:
            rid = request_ids[i]
            if rid in self._pending and (error := self._resolve(rid)) is not None:
                errors[rid] = error  # no mask was asked for: its compile ends here
                continue
            matcher = self.matchers.get(rid)
            if matcher is None:
                continue  # failed while filling its mask
            try:
                ok = matcher.accept(tokens[i])
            except Exception as exc:  # a matcher bug fails its request only
                logger.exception("grammar matcher of %s failed", rid)
                errors[rid] = f"the grammar matcher failed: {exc}"
                self.matchers.pop(rid)
                continue
            if not ok:
                errors[rid] = (
                    f"sampled token {tokens[i]} is not allowed by the grammar "
                    f"{matcher.error()}".rstrip()
                )
                self.matchers.pop(rid)
            elif matcher.terminated:
                terminated.append(rid)
        return terminated, errors

    def shutdown(self) -> None:
        for pool in (self._pool, self._compile_pool):
            if pool is not None:
                pool.shutdown(wait=False)
