"""Structured-output constraints compiled for the sampling rank, with xgrammar or llguidance.

A `GrammarSpec` (kind json | json_object | regex | choice | grammar, the constraint text, the
backend asked for, a whitespace pattern) becomes a `CompiledGrammar`: a handle (SHA-256 over
backend, kind and text), the backend that compiled it, and bytes the sampling rank rebuilds a
matcher from (xgrammar: its serialized Grammar, which the sampling rank compiles again for
its tokenizer, cached by handle; llguidance: its grammar JSON, which needs no precompute).

Output that breaks the constraint is never acceptable, so a schema keyword a backend would
only approximate is refused with INVALID_ARGUMENT naming it, or, under `auto`, sent to the
other backend. What each backend leaves out (found by feeding both backends instances that
break the keyword):
- xgrammar 0.2.8 treats `oneOf` as `anyOf` unless it proves the branches disjoint, keeps only
  one schema of a multi-schema `allOf`, ignores `not`, `if`/`then`/`else`,
  `dependentSchemas` and unknown string `format`s; anything not on `_XGRAMMAR_KEYWORDS` is
  refused. It cannot take a whitespace pattern.
- llguidance 1.9.1 refuses (itself) every keyword it does not implement (`oneOf`, `not`,
  `uniqueItems`, `contains`, `if`, `propertyNames`, unknown formats, ...).
A `oneOf` whose branches are provably disjoint (schema_disjoint.py) means the same as `anyOf`,
so either backend takes it: xgrammar as is, llguidance with `coerce_one_of`. `dependencies`
and some forms of `not` are rewritten into equal keywords llguidance has (schema_lowering.py).
Keywords that only narrow the accepted set (xgrammar's strict additionalProperties, fixed
property order in llguidance) are fine: every output still validates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pathlib
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from splitserve.protos import common_pb2

from .errors import InvalidRequest, RequestError
from .schema_disjoint import one_of_disjoint, one_of_lists
from .schema_lowering import lower_for_guidance

logger = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
BACKENDS = ("xgrammar", "guidance", "auto")

# JSON Schema's validation and applicator keywords (drafts 4 to 2020-12). Other keys are
# annotations or unknown, which validators ignore, and so may a backend.
_VALIDATION_KEYWORDS = frozenset(
    "type enum const properties required additionalProperties items prefixItems additionalItems "
    "minItems maxItems uniqueItems contains minContains maxContains minLength maxLength pattern "
    "format minimum maximum exclusiveMinimum exclusiveMaximum multipleOf anyOf allOf oneOf not "
    "if then else $ref $defs definitions patternProperties propertyNames minProperties "
    "maxProperties dependencies dependentRequired dependentSchemas unevaluatedProperties "
    "unevaluatedItems $dynamicRef $recursiveRef contentSchema".split()
)
# The ones xgrammar enforces exactly or more narrowly (checked with breaking instances);
# `_xgrammar_departure` adds the conditions some of them need.
_XGRAMMAR_KEYWORDS = frozenset(
    "type enum const properties required additionalProperties items prefixItems minItems "
    "maxItems minLength maxLength pattern format minimum maximum exclusiveMinimum "
    "exclusiveMaximum multipleOf anyOf allOf oneOf $ref $defs definitions patternProperties "
    "maxProperties minProperties".split()
)
# String formats xgrammar turns into a grammar; any other format it lets through unchecked.
_XGRAMMAR_FORMATS = frozenset(
    "email date time date-time duration uri uri-reference uri-template uuid ipv4 ipv6 hostname "
    "json-pointer relative-json-pointer".split()
)
# Keywords whose value maps names to subschemas, or lists subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] [^:]+:\d+: ", re.MULTILINE)


class GrammarError(InvalidRequest):
    """A constraint that cannot be compiled or enforced exactly (INVALID_ARGUMENT)."""


class CompileTimeout(RequestError):
    """The compile ran past --grammar-compile-timeout-s."""

    status = "DEADLINE_EXCEEDED"


class CompilePoolFull(RequestError):
    """Too many compiles running or queued."""

    status = "RESOURCE_EXHAUSTED"


def grammar_handle(backend: str, kind: str, spec: str, whitespace_pattern: str) -> str:
    """SHA-256 (hex) over backend, kind, text and whitespace pattern, each length-prefixed:
    the cache key everywhere (tokenizer service and sampling rank)."""
    h = hashlib.sha256()
    for part in (backend, kind, spec, whitespace_pattern):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------- tokenizers


def grammar_vocab_size(folder: str | pathlib.Path | None, tokenizer_len: int) -> int:
    """Token ids the model can emit: config.json's vocab_size (embedding rows may exceed the
    tokenizer's), or the tokenizer's length without a readable config."""
    if folder is not None:
        try:
            config = json.loads((pathlib.Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        if isinstance(size, int) and size > 0:
            return max(size, tokenizer_len)
    return tokenizer_len


def grammar_stop_ids(folder: str | pathlib.Path | None, tokenizer) -> list[int]:
    """The ids that end generation: the tokenizer's EOS plus config and generation config's."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(tokenizer, "eos_token_id", None))
    if folder is not None:
        for name in ("config.json", "generation_config.json"):
            try:
                add(json.loads((pathlib.Path(folder) / name).read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError):
                pass
    return sorted(ids)


class GrammarTokenizer:
    """The tokenizer as each backend wants it, built on first use (thread-safe)."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._lock = threading.Lock()
        self._xgrammar_infos: dict[tuple[int, tuple[int, ...]], object] = {}
        self._guidance = None

    def xgrammar_info(self, vocab_size: int | None = None, stop_ids: list[int] | None = None):
        """xgrammar.TokenizerInfo for (vocab_size, stop ids), the defaults being ours."""
        key = (vocab_size or self.vocab_size, tuple(stop_ids or self.stop_token_ids))
        with self._lock:
            info = self._xgrammar_infos.get(key)
            if info is None:
                info = self._build_xgrammar_info(*key)
                self._xgrammar_infos[key] = info
            return info

    def _build_xgrammar_info(self, vocab_size: int, stop_ids: tuple[int, ...]):
        import xgrammar

        base = xgrammar.TokenizerInfo.from_huggingface(
            self.hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
        )
        # NOTE: xgrammar reads special tokens such as <|im_start|> as their literal text, so
        # they could appear inside a JSON string; an empty entry is never allowed.
        special = set(self.special_token_ids()) - set(stop_ids)
        if not special:
            return base
        vocab = list(base.decoded_vocab)
        for i in special:
            if i < len(vocab):
                vocab[i] = b""
        return xgrammar.TokenizerInfo(
            vocab,
            xgrammar.VocabType.RAW,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_ids),
            add_prefix_space=base.add_prefix_space,
        )

    def special_token_ids(self) -> list[int]:
        """Ids of the tokenizer's special (control) tokens."""
        tok = self.hf_tokenizer
        ids = set(getattr(tok, "all_special_ids", []) or [])
        decoder = getattr(tok, "added_tokens_decoder", {}) or {}
        ids.update(i for i, t in decoder.items() if getattr(t, "special", False))
        return sorted(ids)

    def guidance_tokenizer(self):
        """llguidance.LLTokenizer over the model's vocabulary."""
        with self._lock:
            if self._guidance is None:
                import llguidance.hf

                self._guidance = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_token_ids
                )
            return self._guidance


# ---------------------------------------------------------------------------- parsing


def _parse_schema(spec: str) -> dict | bool:
    try:
        schema = json.loads(spec)
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(
            f"a JSON schema must be an object or a boolean, got {type(schema).__name__}"
        )
    return schema


def _parse_choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except ValueError as exc:
        raise GrammarError(f"choice must be a JSON array of strings: {exc}") from None
    if (
        not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise GrammarError("choice must be a non-empty JSON array of non-empty strings")
    return choices


def xgrammar_unsupported(schema, path: str = "#", root=None) -> str | None:
    """The first schema keyword xgrammar would not enforce exactly, as 'keyword at path'
    (`root`: the whole schema, which local `$ref`s point into; `schema` itself if None)."""
    root = schema if root is None else root
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"a non-schema value at {path}"
    for key, value in schema.items():
        if key in _VALIDATION_KEYWORDS:
            found = _xgrammar_departure(schema, key, value, root)
            if found:
                return f"{found} at {path}/{key}"
    for key in _SCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for name, s in sub.items():
                found = xgrammar_unsupported(s, f"{path}/{key}/{name}", root)
                if found:
                    return found
    for key in _SCHEMA_LISTS:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                found = xgrammar_unsupported(s, f"{path}/{key}/{i}", root)
                if found:
                    return found
    for key in _SCHEMA_VALUES:
        sub = schema.get(key)
        if isinstance(sub, dict):
            found = xgrammar_unsupported(sub, f"{path}/{key}", root)
            if found:
                return found
    return None


def _xgrammar_departure(schema: dict, key: str, value, root) -> str | None:
    """Why xgrammar would not enforce `key` of `schema` exactly, or None."""
    if key not in _XGRAMMAR_KEYWORDS:
        return f"'{key}'"
    if key == "oneOf" and isinstance(value, list) and not one_of_disjoint(value, root):
        return (
            f"'oneOf' with {len(value)} branches not provably disjoint "
            "(xgrammar treats it as anyOf)"
        )
    if key == "allOf" and isinstance(value, list) and len(value) > 1:
        return f"'allOf' with {len(value)} schemas"
    if key == "format" and value not in _XGRAMMAR_FORMATS:
        return f"string format {value!r}"
    if key == "items" and isinstance(value, list):
        return "'items' as an array (tuple validation)"
    if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
        return f"a '$ref' outside the schema ({value!r})"
    if key == "multipleOf" and (schema.get("type") != "integer" or not isinstance(value, int)):
        return "'multipleOf' other than an integer on an integer"
    ranged = [
        k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema
    ]
    if key == "multipleOf" and ranged:
        # xgrammar 0.2.8 drops multipleOf when a range comes with it ("ignoring multipleOf").
        return f"'multipleOf' together with '{ranged[0]}'"
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    if key in ("pattern", "format") and lengths:
        # xgrammar 0.2.8 drops the length limits of a pattern or format string.
        return f"'{key}' together with '{lengths[0]}'"
    if key == "pattern" and isinstance(value, str):
        found = xgrammar_regex_departure(value)
        if found:
            return f"'pattern' with {found}"
    if key == "required" and isinstance(value, list):
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        missing = [name for name in value if name not in props]
        if missing:
            return f"'required' naming {missing[0]!r}, which 'properties' does not define"
    return None


def xgrammar_regex_departure(regex: str) -> str | None:
    """What of `regex` xgrammar would ignore rather than enforce, or None: lookahead (it
    skips the assertion) and `^` / `$` anywhere but the very start / end (it drops them)."""
    i, n, in_class = 0, len(regex), False
    while i < n:
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if regex.startswith("[^", i) or regex.startswith("[]", i):
                i += 1  # a leading ^ negates, a leading ] is literal
        elif regex.startswith("(?=", i) or regex.startswith("(?!", i):
            return "a lookahead assertion"
        elif c == "^" and i != 0:
            return "'^' in the middle"
        elif c == "$" and i != n - 1:
            return "'$' in the middle"
        i += 1
    return None


def _clean_xgrammar_error(exc: Exception) -> str:
    text = _XGRAMMAR_LOG_PREFIX.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- backends


def compile_xgrammar(tok: GrammarTokenizer, kind: str, spec: str, ws: str) -> bytes:
    """Compile with xgrammar; returns its serialized Grammar (UTF-8 JSON), once the grammar
    is proven to compile for this tokenizer."""
    grammar = xgrammar_grammar(kind, spec, ws)
    try:
        # The token-mask precompute, here to prove the grammar compiles for this tokenizer
        # (and within the time limit); the sampling rank repeats it from the small grammar.
        xgrammar_compiler(tok).compile_grammar(grammar)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError on bad input
        raise GrammarError(
            f"xgrammar cannot compile the {kind}: {_clean_xgrammar_error(exc)}"
        ) from None
    # NOTE: the compiled form's serialization carries the adaptive token-mask cache (tens of
    # MB for a small schema at a large vocabulary); the grammar itself is a few KB.
    return grammar.serialize_json().encode()


def xgrammar_grammar(kind: str, spec: str, ws: str):
    """The xgrammar Grammar of a constraint (checked, not yet compiled for a vocabulary)."""
    import xgrammar

    if ws and kind in ("json", "json_object"):
        raise GrammarError(
            "backend xgrammar cannot take a whitespace_pattern; use backend guidance or auto"
        )
    if kind == "json":
        missing = xgrammar_unsupported(_parse_schema(spec))
        if missing:
            raise GrammarError(
                f"backend xgrammar does not enforce JSON-schema {missing} exactly; "
                "use backend guidance or auto"
            )
    Grammar = xgrammar.Grammar
    try:
        if kind == "json":
            grammar = _xgrammar_json(Grammar.from_json_schema(spec, strict_mode=True))
        elif kind == "json_object":
            grammar = _xgrammar_json(Grammar.from_json_schema('{"type": "object"}'))
        elif kind == "regex":
            ignored = xgrammar_regex_departure(spec)
            if ignored:
                raise GrammarError(
                    f"backend xgrammar does not enforce a regex with {ignored}; "
                    "use backend guidance or auto"
                )
            grammar = Grammar.from_regex(spec)
        elif kind == "choice":
            alternatives = " | ".join(_ebnf_string(c) for c in _parse_choices(spec))
            grammar = Grammar.from_ebnf(f"root ::= {alternatives}")
        else:
            grammar = Grammar.from_ebnf(spec)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError on bad input
        raise GrammarError(
            f"xgrammar cannot compile the {kind}: {_clean_xgrammar_error(exc)}"
        ) from None
    return grammar


# xgrammar 0.2.8 writes the characters of a length-limited JSON string as [^"\\\r\n]: raw
# control characters (U+0000-U+001F), which JSON forbids in strings, get through.
_XGRAMMAR_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\]"
_EBNF_REGEX_CALL = re.compile(r'Regex\("(?:[^"\\]|\\.)*"[^)]*\)')
_NEGATED_CLASS = re.compile(r"\[\^(?!\\0-\\x1f)")


def _xgrammar_json(grammar):
    """The JSON grammar with raw control characters kept out of every string."""
    import xgrammar

    text = str(grammar).replace(_XGRAMMAR_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR)
    # NOTE: a regex `pattern` compiles to a Regex(..., json_string=true) call, which keeps
    # control characters out by itself; any other negated class must exclude them.
    loose = _NEGATED_CLASS.search(_EBNF_REGEX_CALL.sub("", text))
    if loose:
        raise GrammarError(
            "backend xgrammar would let control characters into a JSON string here "
            f"({text[loose.start() : loose.start() + 30]!r}); use backend guidance or auto"
        )
    return xgrammar.Grammar.from_ebnf(text)


def xgrammar_compiler(tok: GrammarTokenizer):
    """An xgrammar GrammarCompiler over the tokenizer (we cache by handle ourselves)."""
    import xgrammar

    return xgrammar.GrammarCompiler(tok.xgrammar_info(), max_threads=1, cache_enabled=False)


def _ebnf_string(text: str) -> str:
    """A quoted EBNF literal; non-ASCII stays raw (xgrammar reads UTF-8 in literals)."""
    return json.dumps(text, ensure_ascii=False)


def compile_guidance(tok: GrammarTokenizer, kind: str, spec: str, ws: str) -> bytes:
    """Build and validate an llguidance grammar; returns its grammar text (UTF-8)."""
    import llguidance

    try:
        if kind in ("json", "json_object"):
            schema = _parse_schema(spec) if kind == "json" else {"type": "object"}
            schema = lower_for_guidance(schema)
            options = _guidance_options(schema, ws)
            if options:
                if isinstance(schema, bool):
                    schema = {} if schema else {"not": {}}
                schema = {**schema, "x-guidance": options}
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", spec)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", json.dumps(_parse_choices(spec)))
        else:
            grammar = llguidance.grammar_from("grammar", spec)
    except GrammarError:
        raise
    except Exception as exc:  # grammar_from raises ValueError / Exception on bad text
        raise GrammarError(f"llguidance cannot read the {kind}: {exc}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, tok.guidance_tokenizer()
    )
    if not is_error:  # building a matcher surfaces errors the validation pass leaves out
        matcher = llguidance.LLMatcher(tok.guidance_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            is_error, messages = True, [matcher.get_error()]
    if is_error:
        detail = "; ".join(m.strip() for m in messages) or "invalid grammar"
        raise GrammarError(f"llguidance cannot compile the {kind}: {detail}")
    return grammar.encode()


def _guidance_options(schema: dict | bool, ws: str) -> dict:
    """llguidance's `x-guidance` options for `schema`: the whitespace pattern, and
    `coerce_one_of` (read `oneOf` as `anyOf`) only when every `oneOf` is provably disjoint,
    where the two mean the same. A schema's own `x-guidance` is refused: its options
    (`coerce_one_of`, `lenient`) could make llguidance enforce less than the schema says."""
    if isinstance(schema, bool):
        return {"whitespace_pattern": ws} if ws else {}
    if "x-guidance" in schema:
        raise GrammarError(
            "a JSON schema may not carry llguidance's 'x-guidance' options; "
            "give structured_outputs.whitespace_pattern instead"
        )
    options = {"whitespace_pattern": ws} if ws else {}
    lists = one_of_lists(schema)
    if lists and all(one_of_disjoint(branches, schema) for branches in lists):
        options["coerce_one_of"] = True
    return options


_COMPILERS = {"xgrammar": compile_xgrammar, "guidance": compile_guidance}


def _xgrammar_uncompiled(tok: GrammarTokenizer, kind: str, spec: str, ws: str) -> bytes:
    """xgrammar's serialized Grammar without the vocabulary precompute (see uncompiled_grammar)."""
    return xgrammar_grammar(kind, spec, ws).serialize_json().encode()


_UNCOMPILED = {"xgrammar": _xgrammar_uncompiled, "guidance": compile_guidance}


def resolve_spec(spec: common_pb2.GrammarSpec, default_backend: str) -> tuple[str, str]:
    """(backend asked for, handle) after checking kind and backend; `default_backend` stands
    in for an empty one."""
    if spec.kind not in KINDS:
        raise GrammarError(f"unknown constraint kind {spec.kind!r}; expected {', '.join(KINDS)}")
    backend = spec.backend or default_backend
    if backend not in BACKENDS:
        raise GrammarError(
            f"unknown guided decoding backend {spec.backend!r}; expected {', '.join(BACKENDS)}"
        )
    if spec.kind != "json_object" and not spec.spec:
        raise GrammarError(f"the {spec.kind} constraint is empty")
    return backend, grammar_handle(backend, spec.kind, spec.spec, spec.whitespace_pattern)


def build(
    compilers: dict, tok: GrammarTokenizer, backend: str, spec: common_pb2.GrammarSpec
) -> tuple[str, bytes]:
    """(backend used, bytes) from `compilers[backend]`; under auto xgrammar first, then
    guidance when xgrammar refuses the constraint."""
    args = (tok, spec.kind, spec.spec, spec.whitespace_pattern)
    if backend != "auto":
        return backend, compilers[backend](*args)
    try:
        return "xgrammar", compilers["xgrammar"](*args)
    except GrammarError as first:
        try:
            return "guidance", compilers["guidance"](*args)
        except GrammarError as second:
            raise GrammarError(
                f"no backend can enforce this constraint: {first.message}; {second.message}"
            ) from None


def uncompiled_grammar(
    tok: GrammarTokenizer, spec: common_pb2.GrammarSpec, default_backend: str
) -> common_pb2.CompiledGrammar:
    """What the tokenizer service would ship for `spec`, checked the same way, but without
    xgrammar's vocabulary precompute: for a sampling rank handed a bare spec (a direct
    Generate caller), which runs that precompute itself next and would only do it twice.
    Raises GrammarError for a constraint the service would refuse."""
    backend, handle = resolve_spec(spec, default_backend)
    used, data = build(_UNCOMPILED, tok, backend, spec)
    return common_pb2.CompiledGrammar(handle=handle, backend=used, compiled=data)


# ---------------------------------------------------------------------------- the compiler


@dataclass(frozen=True, slots=True)
class CompileResult:
    grammar: common_pb2.CompiledGrammar
    """Handle, backend and compiled bytes."""
    seconds: float
    """Compile time (0 on a cache hit)."""
    cache_hit: bool


class GrammarCompiler:
    """Compiles GrammarSpecs, caching the results (LRU by handle), in a bounded thread pool."""

    def __init__(
        self,
        tokenizer: GrammarTokenizer,
        default_backend: str = "auto",
        cache_size: int = 256,
        timeout_s: float = 30.0,
        threads: int = 2,
        max_pending: int = 16,
    ) -> None:
        if default_backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        self.tokenizer = tokenizer
        self.default_backend = default_backend
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._cache: OrderedDict[str, common_pb2.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pending = 0
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="grammar")

    def resolve(self, spec: common_pb2.GrammarSpec) -> tuple[str, str]:
        """(backend asked for, handle) after checking kind and backend."""
        return resolve_spec(spec, self.default_backend)

    def lookup(self, handle: str) -> common_pb2.CompiledGrammar | None:
        with self._lock:
            hit = self._cache.get(handle)
            if hit is not None:
                self._cache.move_to_end(handle)
            return hit

    def _store(self, compiled: common_pb2.CompiledGrammar) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            self._cache[compiled.handle] = compiled
            self._cache.move_to_end(compiled.handle)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def compile_sync(self, spec: common_pb2.GrammarSpec) -> CompileResult:
        """Compile in the calling thread (cache first)."""
        backend, handle = self.resolve(spec)
        hit = self.lookup(handle)
        if hit is not None:
            return CompileResult(hit, 0.0, True)
        start = time.perf_counter()
        used, data = self._compile(backend, spec)
        compiled = common_pb2.CompiledGrammar(handle=handle, backend=used, compiled=data)
        self._store(compiled)
        return CompileResult(compiled, time.perf_counter() - start, False)

    def _compile(self, backend: str, spec: common_pb2.GrammarSpec) -> tuple[str, bytes]:
        return build(_COMPILERS, self.tokenizer, backend, spec)

    async def compile(self, spec: common_pb2.GrammarSpec) -> CompileResult:
        """Compile in the pool, at most `timeout_s` seconds; a full pool is refused."""
        _, handle = self.resolve(spec)
        hit = self.lookup(handle)
        if hit is not None:
            return CompileResult(hit, 0.0, True)
        with self._lock:
            if self._pending >= self.max_pending:
                raise CompilePoolFull(
                    f"{self._pending} grammar compiles are already running or queued; retry later"
                )
            self._pending += 1
        future = self._executor.submit(self.compile_sync, spec)

        def release(_f) -> None:
            # NOTE: a compile that timed out still holds its slot until its thread finishes,
            # so slow constraints cannot pile up unbounded work.
            with self._lock:
                self._pending -= 1

        future.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise CompileTimeout(
                f"compiling the {spec.kind} constraint took longer than {self.timeout_s:g} s"
            ) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
