"""Structured outputs: every request surface mapped to one GrammarSpec, checked here for shape,
then compiled by the tokenizer service in the request's Prepare call (`prepare.py`) before the
engine sees the request.

Surfaces: OpenAI `response_format`; vLLM's `structured_outputs` object; vLLM's older top-level
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` with the modifiers
`guided_decoding_backend` and `guided_whitespace_pattern`; and, on chat, forced tool calls
(built in tool_calls.py). At most one constraint per request; nothing is silently ignored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from splitserve.gateway.errors import bad_request
from splitserve.gateway.protocol import SamplingFields
from splitserve.protos import common_pb2

# The names a request may use for a backend; "llguidance" is the library's own name.
_BACKENDS = {
    "xgrammar": "xgrammar",
    "guidance": "guidance",
    "llguidance": "guidance",
    "auto": "auto",
}
_JSON_KINDS = ("json", "json_object")
# structured_outputs keys that each state a constraint, in vLLM's order.
_SO_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_SO_MODIFIERS = (
    "backend",
    "whitespace_pattern",
    "disable_any_whitespace",
    "disable_additional_properties",
    "disable_fallback",
)


@dataclass(frozen=True, slots=True)
class Source:
    """One constraint as one surface stated it."""

    label: str
    """Where it came from, as the user wrote it ("response_format", "structured_outputs.json")."""
    param: str
    """The top-level request field, for the error's `param`."""
    kind: str
    spec: str


@dataclass(frozen=True, slots=True)
class Constraint:
    """The request's one constraint, ready for the Prepare call (PrepareRequest.grammar)."""

    grammar: common_pb2.GrammarSpec
    label: str
    param: str


def resolve_constraint(req: SamplingFields, extra: list[Source] | None = None) -> Constraint | None:
    """The request's constraint, or None; a 400 for a bad shape or for two constraints.
    `extra` holds constraints from other surfaces (chat's forced tool calls)."""
    sources: list[Source] = []
    fmt = _response_format(req)
    if fmt is not None:
        sources.append(fmt)
    so = req.structured_outputs
    if so is not None and not isinstance(so, dict):
        raise bad_request("structured_outputs must be an object", "structured_outputs")
    so = so or {}
    _check_so_keys(so)
    sources.extend(_so_sources(so))
    sources.extend(_guided_sources(req))
    sources.extend(extra or ())
    backend = _backend(req, so)
    whitespace = _whitespace(req, so)
    if len(sources) > 1:
        names = " and ".join(s.label for s in sources[:2])
        more = f" (and {len(sources) - 2} more)" if len(sources) > 2 else ""
        raise bad_request(
            f"a request may carry one structured-output constraint, got {names}{more}",
            sources[0].param,
        )
    if not sources:
        _check_no_modifiers(req, so, backend, whitespace)
        return None
    (src,) = sources
    spec = src.spec
    if whitespace and src.kind not in _JSON_KINDS:
        raise bad_request(
            f"a whitespace pattern applies to JSON constraints only, not to {src.label} "
            f"({src.kind})",
            _whitespace_param(req),
        )
    if so.get("disable_additional_properties"):
        if src.kind != "json":
            raise bad_request(
                "structured_outputs.disable_additional_properties applies to a JSON schema "
                f"only, not to {src.label}",
                "structured_outputs",
            )
        spec = json.dumps(_close_objects(json.loads(spec)), separators=(",", ":"))
    if so.get("disable_fallback") and backend in ("", "auto"):
        raise bad_request(
            "structured_outputs.disable_fallback needs a named backend (xgrammar or guidance): "
            "only 'auto' chooses between backends",
            "structured_outputs",
        )
    grammar = common_pb2.GrammarSpec(
        kind=src.kind, spec=spec, backend=backend, whitespace_pattern=whitespace
    )
    return Constraint(grammar, src.label, src.param)


# ----------------------------------------------------------------------------- surfaces


def _response_format(req: SamplingFields) -> Source | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Source("response_format json_object", "response_format", "json_object", "")
    if fmt.type != "json_schema":
        raise bad_request(
            f"response_format type '{fmt.type[:40]}' is not supported; use 'text', "
            "'json_object' or 'json_schema'",
            "response_format",
        )
    js = fmt.json_schema
    if js is None:
        raise bad_request(
            "response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'",
            "response_format",
        )
    if "schema" not in js or js["schema"] is None:
        raise bad_request(
            "response_format.json_schema.schema is missing: give the JSON schema to follow",
            "response_format",
        )
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("response_format.json_schema.strict must be a boolean", "response_format")
    # NOTE: strict or not, the schema is enforced exactly (never approximated).
    spec = schema_text(js["schema"], "response_format.json_schema.schema", "response_format")
    return Source("response_format json_schema", "response_format", "json", spec)


def _check_so_keys(so: dict[str, Any]) -> None:
    unknown = [k for k in so if k not in _SO_CONSTRAINTS and k not in _SO_MODIFIERS]
    if unknown:
        raise bad_request(
            f"structured_outputs has unknown field(s) {', '.join(map(repr, unknown[:5]))}; "
            f"known: {', '.join(_SO_CONSTRAINTS + _SO_MODIFIERS)}",
            "structured_outputs",
        )
    for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
        value = so.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"structured_outputs.{name} must be a boolean", "structured_outputs")
    if so.get("disable_any_whitespace"):
        raise bad_request(
            "structured_outputs.disable_any_whitespace is not supported by this server; "
            "give structured_outputs.whitespace_pattern instead",
            "structured_outputs",
        )
    if so.get("structural_tag") is not None:
        raise bad_request(
            "structured_outputs.structural_tag is not supported by this server",
            "structured_outputs",
        )


def _so_sources(so: dict[str, Any]) -> list[Source]:
    out = []
    p = "structured_outputs"
    if so.get("json") is not None:
        out.append(Source(f"{p}.json", p, "json", schema_text(so["json"], f"{p}.json", p)))
    if so.get("regex") is not None:
        out.append(Source(f"{p}.regex", p, "regex", _text(so["regex"], f"{p}.regex", p)))
    if so.get("choice") is not None:
        out.append(Source(f"{p}.choice", p, "choice", choice_text(so["choice"], f"{p}.choice", p)))
    if so.get("grammar") is not None:
        out.append(Source(f"{p}.grammar", p, "grammar", _text(so["grammar"], f"{p}.grammar", p)))
    json_object = so.get("json_object")
    if json_object is not None:
        if not isinstance(json_object, bool):
            raise bad_request(f"{p}.json_object must be a boolean", p)
        if json_object:
            out.append(Source(f"{p}.json_object", p, "json_object", ""))
    return out


def _guided_sources(req: SamplingFields) -> list[Source]:
    out = []
    if req.guided_json is not None:
        spec = schema_text(req.guided_json, "guided_json", "guided_json")
        out.append(Source("guided_json", "guided_json", "json", spec))
    if req.guided_regex is not None:
        spec = _text(req.guided_regex, "guided_regex", "guided_regex")
        out.append(Source("guided_regex", "guided_regex", "regex", spec))
    if req.guided_choice is not None:
        spec = choice_text(req.guided_choice, "guided_choice", "guided_choice")
        out.append(Source("guided_choice", "guided_choice", "choice", spec))
    if req.guided_grammar is not None:
        spec = _text(req.guided_grammar, "guided_grammar", "guided_grammar")
        out.append(Source("guided_grammar", "guided_grammar", "grammar", spec))
    return out


# ----------------------------------------------------------------------------- modifiers


def _backend(req: SamplingFields, so: dict[str, Any]) -> str:
    given = {}
    if req.guided_decoding_backend is not None:
        given["guided_decoding_backend"] = req.guided_decoding_backend
    if so.get("backend") is not None:
        given["structured_outputs.backend"] = so["backend"]
    names = set()
    for label, value in given.items():
        param = label.split(".")[0]
        if not isinstance(value, str) or value not in _BACKENDS:
            shown = value[:40] if isinstance(value, str) else type(value).__name__
            raise bad_request(
                f"{label} must be one of xgrammar, guidance (llguidance) or auto, got {shown!r}",
                param,
            )
        names.add(_BACKENDS[value])
    if len(names) > 1:
        raise bad_request(
            "guided_decoding_backend and structured_outputs.backend disagree",
            "guided_decoding_backend",
        )
    return names.pop() if names else ""


def _whitespace(req: SamplingFields, so: dict[str, Any]) -> str:
    values = []
    if req.guided_whitespace_pattern is not None:
        if not isinstance(req.guided_whitespace_pattern, str):
            raise bad_request(
                "guided_whitespace_pattern must be a string", "guided_whitespace_pattern"
            )
        values.append(req.guided_whitespace_pattern)
    wp = so.get("whitespace_pattern")
    if wp is not None:
        if not isinstance(wp, str):
            raise bad_request(
                "structured_outputs.whitespace_pattern must be a string", "structured_outputs"
            )
        values.append(wp)
    for v in values:
        if not v:
            raise bad_request(
                "a whitespace pattern must not be empty (leave it out for the default)",
                _whitespace_param(req),
            )
    if len(set(values)) > 1:
        raise bad_request(
            "guided_whitespace_pattern and structured_outputs.whitespace_pattern disagree",
            "guided_whitespace_pattern",
        )
    return values[0] if values else ""


def _whitespace_param(req: SamplingFields) -> str:
    if req.guided_whitespace_pattern is not None:
        return "guided_whitespace_pattern"
    return "structured_outputs"


def _check_no_modifiers(
    req: SamplingFields, so: dict[str, Any], backend: str, whitespace: str
) -> None:
    """A modifier with no constraint to modify is an error, not a silent no-op."""
    if backend:
        param = "guided_decoding_backend" if req.guided_decoding_backend else "structured_outputs"
        raise bad_request(
            "a structured-output backend was given without a constraint "
            "(response_format, structured_outputs or guided_*)",
            param,
        )
    if whitespace:
        raise bad_request(
            "a whitespace pattern was given without a JSON constraint", _whitespace_param(req)
        )
    for name in ("disable_additional_properties", "disable_fallback"):
        if so.get(name):
            raise bad_request(
                f"structured_outputs.{name} was given without a constraint", "structured_outputs"
            )


# ----------------------------------------------------------------------------- shapes


def schema_text(value: Any, label: str, param: str) -> str:
    """A JSON schema (object, boolean, or either as JSON text) as compact JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{label} is not valid JSON: {exc}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(
            f"{label} must be a JSON schema (an object or a boolean), got {_kind(value)}", param
        )
    return json.dumps(value, separators=(",", ":"))


def choice_text(value: Any, label: str, param: str) -> str:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise bad_request(f"{label} must be a list of strings", param)
    if not value:
        raise bad_request(f"{label} must hold at least one choice", param)
    return json.dumps(value)


def _text(value: Any, label: str, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{label} must be a string, got {_kind(value)}", param)
    if not value:
        raise bad_request(f"{label} must not be empty", param)
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "an array" if isinstance(value, list) else "an object"
    )


def _close_objects(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema that does not say otherwise
    gets `additionalProperties: false`."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            is_object = node.get("type") == "object" or "properties" in node
            if is_object and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema
