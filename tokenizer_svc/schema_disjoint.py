"""Proving a JSON schema's `oneOf` branches pairwise disjoint, so it means the same as `anyOf`.

Neither backend enforces `oneOf` ("exactly one branch matches"): xgrammar reads it as `anyOf`,
llguidance does so only when told to (`coerce_one_of`). Where no value can match two branches,
the two keywords accept the same values, and either backend enforces the schema exactly. Real
schemas mostly use `oneOf` that way: "a string or an array of strings", "X or null", a tagged
union whose required `kind` property has a different `const` in every branch.

The proof is sound, not complete: it uses a subset of each branch's constraints (fewer
constraints accept more values, so sets shown disjoint are disjoint), and says "not proven"
whenever it is unsure. What it reads:
- the JSON types a branch can take (`type`, `const`, `enum`, `allOf`, `anyOf`, `oneOf`, a local
  `$ref`), `integer` counting as a `number`;
- the literal values of `const` / `enum`;
- for two object branches, a property both require whose subschemas are disjoint, or one
  that a branch requires and the other forbids (`additionalProperties: false`, or `false`).
A `$ref` is read alone: draft 7 ignores its siblings, later drafts only add to them.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

_ALL_TYPES = frozenset(("null", "boolean", "object", "array", "string", "number"))
_MAX_DEPTH = 16
# Keywords whose values are data, not schemas: a "oneOf" key inside them is not a keyword.
_DATA_KEYWORDS = ("const", "enum", "default", "examples", "example")


def one_of_lists(schema) -> list[list]:
    """Every `oneOf` list in `schema`, however deep (data values such as `enum` skipped)."""
    found: list[list] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _DATA_KEYWORDS:
                    continue
                if key == "oneOf" and isinstance(value, list):
                    found.append(value)
                stack.append(value)
    return found


def one_of_disjoint(branches: list, root) -> bool:
    """True when no value can match two of `branches` (local `$ref`s resolved in `root`)."""
    return all(disjoint(a, b, root) for i, a in enumerate(branches) for b in branches[i + 1 :])


def disjoint(a, b, root, depth: int = 0) -> bool:
    """True when schemas `a` and `b` share no valid value (False: not proven)."""
    if depth > _MAX_DEPTH:
        return False
    a, b = _resolve(a, root), _resolve(b, root)
    if a is None or b is None:
        return False
    shared = _types(a, root, depth) & _types(b, root, depth)
    if not shared:
        return True
    la, lb = _literals(a), _literals(b)
    if la is not None and lb is not None and not la & lb:
        return True
    if shared == {"object"} and isinstance(a, dict) and isinstance(b, dict):
        if any(_forbids(a, name) for name in _required(b)):
            return True
        if any(_forbids(b, name) for name in _required(a)):
            return True
        pa, pb = _properties(a), _properties(b)
        for name in _required(a) & _required(b):
            if name in pa and name in pb and disjoint(pa[name], pb[name], root, depth + 1):
                return True
    return False


def _properties(schema: dict) -> dict:
    value = schema.get("properties")
    return value if isinstance(value, dict) else {}


def _forbids(schema: dict, name: str) -> bool:
    """True when an object valid for `schema` cannot have property `name`: its subschema is
    false, or `additionalProperties: false` covers it (no patternProperties to check)."""
    props = _properties(schema)
    if name in props:
        return props[name] is False
    return schema.get("additionalProperties") is False and not schema.get("patternProperties")


def _resolve(schema, root, hops: int = 0):
    """`schema` with a local `$ref` followed (its siblings dropped); None if unresolvable."""
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        if hops >= _MAX_DEPTH or not isinstance(ref, str) or not ref.startswith("#"):
            return None
        schema = _pointer(root, ref[1:])
        hops += 1
    return schema


def _pointer(root, pointer: str):
    node = root
    if not pointer:
        return node
    if not pointer.startswith("/"):
        return None  # an anchor name ("#foo"): not followed
    for part in pointer[1:].split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _types(schema, root, depth: int) -> frozenset[str]:
    """A superset of the JSON types `schema` accepts."""
    if schema is True:
        return _ALL_TYPES
    if schema is False:
        return frozenset()
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return _ALL_TYPES
    types = _ALL_TYPES
    declared = schema.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if isinstance(declared, list) and all(t in _ALL_TYPES or t == "integer" for t in declared):
        types &= frozenset("number" if t == "integer" else t for t in declared)
    literals = _literals(schema)
    if literals is not None:
        types &= frozenset(kind for kind, _ in literals)
    for sub in _list(schema, "allOf"):
        types &= _types(sub, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        branches = _list(schema, key)
        if branches:
            union = frozenset().union(*(_types(s, root, depth + 1) for s in branches))
            types &= union
    return types


def _list(schema: dict, key: str) -> list:
    value = schema.get(key)
    return value if isinstance(value, list) else []


def _literals(schema) -> frozenset[tuple[str, str]] | None:
    """The values `const` / `enum` allow, as (JSON type, canonical text); None: unlimited."""
    if not isinstance(schema, dict):
        return None
    values = None
    if "const" in schema:
        values = frozenset((_canonical(schema["const"]),))
    enum = schema.get("enum")
    if isinstance(enum, list):
        allowed = frozenset(_canonical(v) for v in enum)
        values = allowed if values is None else values & allowed
    return values


def _canonical(value) -> tuple[str, str]:
    """(JSON type, text) equal exactly when JSON Schema calls two values equal (1 == 1.0)."""
    if value is None:
        return "null", "null"
    if isinstance(value, bool):
        return "boolean", json.dumps(value)
    if isinstance(value, (int, float)):
        number = int(value) if isinstance(value, float) and value.is_integer() else value
        return "number", repr(number)
    if isinstance(value, str):
        return "string", json.dumps(value)
    if isinstance(value, list):
        return "array", json.dumps([_canonical(v) for v in value])
    if isinstance(value, dict):
        items = sorted((k, _canonical(v)) for k, v in value.items())
        return "object", json.dumps(items)
    return "unknown", repr(value)


def _required(schema: dict) -> set[str]:
    value = schema.get("required")
    return {n for n in value if isinstance(n, str)} if isinstance(value, list) else set()
