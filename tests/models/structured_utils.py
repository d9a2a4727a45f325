"""Independent checks of constrained outputs (shared by the structured-output engine tests)."""

from __future__ import annotations

from splitserve.protos import common_pb2
from splitserve.tokenizer_svc import grammar as gm
from splitserve.worker.structured_output import StructuredOutputs

OTHER = {"xgrammar": "guidance", "guidance": "xgrammar"}


class Checker:
    """Compiles constraints itself and replays generated tokens through a fresh matcher."""

    def __init__(self, llm, stop_ids: list[int]) -> None:
        tok = llm.get_tokenizer()
        vocab = llm.engine.model_info.vocab_size
        self.stop_ids = list(stop_ids)
        self.compiler = gm.GrammarCompiler(gm.GrammarTokenizer(tok, vocab, self.stop_ids))
        self.matchers = StructuredOutputs(lambda: tok, vocab, self.stop_ids)

    def compile(self, kind: str, text: str, backend: str) -> common_pb2.CompiledGrammar | None:
        try:
            return self.compiler.compile_sync(
                common_pb2.GrammarSpec(kind=kind, spec=text, backend=backend)
            ).grammar
        except gm.GrammarError:
            return None

    def status(self, grammar: common_pb2.CompiledGrammar, token_ids: list[int]) -> str:
        """'complete', 'prefix' or 'rejected' for the generated tokens (a final stop token is
        dropped: it is how the grammar ends)."""
        ids = list(token_ids)
        if ids and ids[-1] in self.stop_ids:
            ids.pop()
        if self.matchers.add("check", grammar, ids) is not None:
            return "rejected"
        try:
            bitmask, _ = self.matchers.fill(["check"], [0])
            words = bitmask[0].tolist()
            ends = any(words[t // 32] >> (t % 32) & 1 for t in self.stop_ids)
            return "complete" if ends else "prefix"
        finally:
            self.matchers.remove("check")


def whitespace_bias(tokenizer, value: float = -30.0) -> dict[int, float]:
    """logit_bias that discourages whitespace-only tokens, so a random model's JSON ends
    within a few tokens (the grammar allows unlimited whitespace), and tokens with DEL or C1
    control characters: JSON allows them raw in strings and xgrammar does, but llguidance
    refuses them, so a cut document holding one could not be cross-checked by it."""
    bias = {}
    for tok in range(len(tokenizer)):
        text = tokenizer.decode([tok])
        if text and (not text.strip() or any(0x7F <= ord(c) <= 0x9F for c in text)):
            bias[tok] = value
    return bias
