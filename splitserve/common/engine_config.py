"""The engine fields that several services read, declared once, and how services agree on them.

`EngineConfig` declares each field (type, default, docstring, check). A service config
inherits the fields it reads from `engine_fields(...)`, so the scheduler, the workers and the
gateway cannot drift apart in defaults, and the CLI generates one flag per field as for any
other field.

Services started apart (compose, or by hand) exchange these fields at start: the scheduler
sends its own in `DescribeRequest`, each worker answers with the values it runs with in
`DescribeResponse`, and the scheduler's `ModelInfo` carries what they agreed on to the gateway.
The rule (`agree`): a field a service was given explicitly, or can no longer change, is
*fixed*; a service takes a peer's fixed value for a field it left at its default (so a flag
given to one service reaches the others), and two different fixed values are refused with an
error that names the field and both values.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from splitserve.common.sampling_params import MAX_LOGPROBS

# NOTE: the scheduler's default, and vLLM's (its SchedulerConfig default and `vllm serve`'s
# on most GPUs). It is the budget the scheduler actually planned with before this was shared;
# the worker's old 8192 only made its memory profile reserve activation room no step used.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass
class EngineConfig:
    """Engine limits that every service reading them must agree on (vLLM's flag names)."""

    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's context length."""
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    """Token budget of one step (prefill chunks plus decodes); the workers' memory profile runs a step this large."""
    max_num_seqs: int = 256
    """Requests running at once."""
    max_logprobs: int = MAX_LOGPROBS
    """Largest logprobs / top_logprobs / prompt_logprobs a request may ask for."""
    enable_lora: bool = False
    """Serve LoRA adapters (vLLM's --enable-lora): --lora-modules at start, and requests whose model names an adapter."""
    max_loras: int = 1
    """Most distinct LoRA adapters in one batch (adapter slots on the device); requests for others wait."""
    max_lora_rank: int = 16
    """Largest adapter rank r accepted; larger adapters are refused."""
    lora_extra_vocab_size: int = 0
    """Tokens a LoRA adapter may add past the base vocabulary (vLLM's flag): new embedding and lm_head rows, for requests through that adapter only. Every step's logits are this much wider and the workers reserve --max-loras slots of rows; an adapter adding more is refused. 0 (vLLM's old default was 256) keeps memory and logits as without it."""

    def __post_init__(self) -> None:
        check_engine_fields(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EngineConfig)}
"""Every engine field by name, in declaration order."""

_AT_LEAST_ONE = ("max_num_batched_tokens", "max_num_seqs", "max_loras", "max_lora_rank")


def check_engine_fields(config: Any) -> None:
    """Check the engine fields `config` has (a service config holds some of them)."""
    for name in _AT_LEAST_ONE:
        value = getattr(config, name, 1)
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    max_model_len = getattr(config, "max_model_len", None)
    if max_model_len is not None and max_model_len < 1:
        raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
    max_logprobs = getattr(config, "max_logprobs", 0)
    if max_logprobs < 0:
        raise ValueError(f"max_logprobs must be non-negative, got {max_logprobs}")


@functools.cache
def engine_fields(*names: str) -> type:
    """A dataclass holding the named engine fields, for a service config to inherit: the
    declarations are EngineConfig's (the CLI reads their docstrings there), `__post_init__`
    checks them (a subclass calls `super().__post_init__()`), and `ENGINE_FIELDS` names them."""
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise ValueError(f"not engine fields: {unknown}; known: {', '.join(FIELDS)}")
    declared = [n for n in FIELDS if n in names]  # declaration order, whatever the call's
    base = dataclasses.make_dataclass(
        "EngineFields",
        [(n, FIELDS[n].type, dataclasses.field(default=FIELDS[n].default)) for n in declared],
        namespace={
            "ENGINE_FIELDS": tuple(declared),
            "DOCS_DECLARED_IN": EngineConfig,
            "explicit_engine_fields": frozenset(),
            "__post_init__": check_engine_fields,
            "__module__": __name__,
        },
    )
    base.__doc__ = f"The engine fields {', '.join(declared)} (declared in EngineConfig)."
    return base


class EngineConfigConflict(ValueError):
    """Two services hold different fixed values of one engine field; the message is one line
    naming the field and both values with their services."""


@dataclass(frozen=True)
class EngineValues:
    """The engine fields one service takes, which of them are fixed, and who fixed each."""

    values: dict[str, Any]
    """Field name -> value, for the fields the service takes."""
    fixed: frozenset[str]
    """Fields that cannot take a peer's value: given explicitly, or already in use."""
    sources: dict[str, str]
    """Field name -> the service its value comes from ("scheduler", "worker rank 0")."""

    def all_fixed(self) -> EngineValues:
        """The same values, all fixed (a service that already runs with them), None aside."""
        fixed = frozenset(n for n, v in self.values.items() if v is not None)
        return dataclasses.replace(self, fixed=fixed)


def engine_values(config: Any, source: str, also_fixed: frozenset[str] = frozenset()):
    """The engine fields of a service config. Fixed: those given explicitly (a flag, a config
    file key, a keyword), those off their default (a config built in code), and `also_fixed`
    (fields the service cannot change after start); but never a None (max_model_len: the
    model's context length), which only says "no limit of my own", as compose's
    `--max-model-len none` does."""
    names = getattr(type(config), "ENGINE_FIELDS", ())
    values = {n: getattr(config, n) for n in names}
    explicit = set(getattr(config, "explicit_engine_fields", ())) | set(also_fixed)
    fixed = {
        n
        for n in names
        if values[n] is not None and (n in explicit or values[n] != FIELDS[n].default)
    }
    return EngineValues(values, frozenset(fixed), dict.fromkeys(names, source))


def agree(a: EngineValues, b: EngineValues) -> EngineValues:
    """What `a` and `b` agree on: equal values stay; a field fixed on one side only takes
    that side's value; a field only one side takes is carried over. Raises
    EngineConfigConflict on the first field whose values differ and are fixed on both sides
    (or on neither: then two defaults differ, which one declaration rules out)."""
    values, fixed, sources = dict(a.values), set(a.fixed), dict(a.sources)
    for name, theirs in b.values.items():
        b_fixed = name in b.fixed
        if name not in values or (values[name] != theirs and name not in fixed and b_fixed):
            values[name], sources[name] = theirs, b.sources[name]
            if b_fixed:
                fixed.add(name)
            continue
        mine = values[name]
        if mine == theirs:
            if b_fixed and name not in fixed:
                fixed.add(name)
                sources[name] = b.sources[name]
            continue
        if name in fixed and not b_fixed:
            continue  # b takes a's value
        flag = "--" + name.replace("_", "-")
        raise EngineConfigConflict(
            f"{name}: {sources[name]} {mine}, {b.sources[name]} {theirs} (engine fields must "
            f"agree: give both the same {flag}, or leave it out of one)"
        )
    return EngineValues(values, frozenset(fixed), sources)


def adopt(config: Any, agreed: EngineValues) -> None:
    """Set the engine fields `config` takes to the agreed values."""
    for name in getattr(type(config), "ENGINE_FIELDS", ()):
        if name in agreed.values:
            setattr(config, name, agreed.values[name])


def to_proto(values: EngineValues):
    """An EngineConfig message: the fields taken, and which are fixed."""
    from splitserve.protos import common_pb2

    msg = common_pb2.EngineConfig(fixed_fields=sorted(values.fixed))
    for name, value in values.values.items():
        # NOTE: max_model_len None (the model's context length) travels as 0.
        setattr(msg, name, 0 if value is None else value)
    return msg


def from_proto(msg, source: str) -> EngineValues:
    """EngineValues from an EngineConfig message sent by `source`; an absent message (a peer
    that states no engine fields) gives none."""
    values: dict[str, Any] = {}
    for name in FIELDS:
        if msg.HasField(name):
            value = getattr(msg, name)
            values[name] = None if name == "max_model_len" and value == 0 else value
    unknown = set(msg.fixed_fields) - set(FIELDS)
    if unknown:
        raise EngineConfigConflict(
            f"{source} fixes engine fields this version does not know: {sorted(unknown)}"
        )
    fixed = frozenset(msg.fixed_fields) & {n for n, v in values.items() if v is not None}
    return EngineValues(values, fixed, dict.fromkeys(values, source))
