"""Rewriting JSON-schema keywords llguidance lacks into equal ones it has, before it compiles.

Every rewrite accepts exactly the values the original accepts (llguidance may still be
narrower, e.g. in property order, which only narrows). What is rewritten, in every subschema:
- `dependencies` (draft 4-7), `dependentRequired`, `dependentSchemas`: "if property p is
  present, the object also has q..." / "...also matches S" becomes an `allOf` entry
  `anyOf: [{properties: {p: false}}, {required: [p, q...]}]` (or `[..., S]`). Both branches
  hold for a non-object, as the original does.
- `not: {}` / `not: true` (matches nothing) becomes an `allOf` entry `false`.
- `not` of a `required` list, or of an `anyOf` of `required` lists: "an object lacking one of
  them" / "an object lacking every property they name", written with `false` properties.
Anything else is left as it is, for the backend to refuse.

NOTE: llguidance multiplies out an `allOf` of `anyOf`s (2^k alternatives for k entries), and a
large product fails at run time, mid-request, past its parser's row limit (seen with 8
dependencies in one subschema). A subschema that would get more than `_MAX_ALTERNATIVES`
`anyOf` entries is left alone, so it is refused before anything runs.
"""

from __future__ import annotations

import copy

_MAX_ALTERNATIVES = 3

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_VALUES = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "contentSchema",
)


def lower_for_guidance(schema):
    """A copy of `schema` with the rewrites above applied to every subschema."""
    schema = copy.deepcopy(schema)
    for node in _subschemas(schema):
        _lower_dependencies(node)
        _lower_not(node)
    return schema


def _subschemas(schema) -> list[dict]:
    """Every object subschema of `schema` (itself included), found before any is changed."""
    found: list[dict] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        found.append(node)
        for key in _SCHEMA_MAPS:
            value = node.get(key)
            if isinstance(value, dict):
                stack.extend(value.values())
        deps = node.get("dependencies")
        if isinstance(deps, dict):
            stack.extend(v for v in deps.values() if isinstance(v, dict))
        for key in _SCHEMA_LISTS:
            value = node.get(key)
            if isinstance(value, list):
                stack.extend(value)
        for key in _SCHEMA_VALUES:
            value = node.get(key)
            if isinstance(value, dict):
                stack.append(value)
    return found


def _add_all_of(node: dict, entry) -> None:
    all_of = node.get("allOf")
    node["allOf"] = [*all_of, entry] if isinstance(all_of, list) else [entry]


def _absent(name: str) -> dict:
    return {"properties": {name: False}}


def _lower_dependencies(node: dict) -> None:
    for key in ("dependencies", "dependentRequired", "dependentSchemas"):
        deps = node.get(key)
        if not isinstance(deps, dict):
            continue
        if len(deps) > _MAX_ALTERNATIVES:
            return
        rewritten = {}
        for name, then in deps.items():
            if isinstance(then, list) and all(isinstance(n, str) for n in then):
                rewritten[name] = {"anyOf": [_absent(name), {"required": [name, *then]}]}
            elif isinstance(then, (dict, bool)):
                rewritten[name] = {"anyOf": [_absent(name), then]}
            else:
                return  # malformed: leave the keyword for the backend to refuse
        del node[key]
        for entry in rewritten.values():
            _add_all_of(node, entry)


def _lower_not(node: dict) -> None:
    if "not" not in node:
        return
    negated = _negation(node["not"])
    if negated is not None:
        del node["not"]
        _add_all_of(node, negated)


def _negation(schema):
    """A schema matching exactly the values `schema` rejects, or None."""
    if schema is True or schema == {}:
        return False
    if isinstance(schema, dict) and set(schema) == {"required"}:
        names = _names(schema["required"])
        if names:
            # `required` holds for every non-object, so its negation is an object.
            return {"type": "object", "anyOf": [_absent(n) for n in names]}
    if isinstance(schema, dict) and set(schema) == {"anyOf"} and isinstance(schema["anyOf"], list):
        lists = [
            _names(b["required"]) if isinstance(b, dict) and set(b) == {"required"} else None
            for b in schema["anyOf"]
        ]
        if lists and all(lists):
            names = sorted({n for names in lists for n in names})
            return {"type": "object", "properties": {n: False for n in names}}
    return None


def _names(value) -> list[str] | None:
    if isinstance(value, list) and value and all(isinstance(n, str) for n in value):
        return value
    return None
