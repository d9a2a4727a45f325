"""The rewrites for llguidance accept exactly what the original schema accepts (checked with
`jsonschema` on instances that meet and break each keyword), and leave the rest alone."""

from __future__ import annotations

import jsonschema
import pytest

from splitserve.tokenizer_svc.schema_lowering import lower_for_guidance

OBJ = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {}, "c": {}}}
INSTANCES = [
    {},
    {"a": 1},
    {"b": 2},
    {"a": 1, "b": 2},
    {"a": 1, "c": 3},
    {"a": 1, "b": 2, "c": 3},
    {"a": "x", "b": 2},
    "text",
    7,
    None,
    [1],
]


def _valid(schema, instance) -> bool:
    return jsonschema.Draft7Validator(schema).is_valid(instance)


def _valid_2020(schema, instance) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


@pytest.mark.parametrize(
    "schema, validate",
    [
        ({**OBJ, "dependencies": {"a": ["b"]}}, _valid),
        ({**OBJ, "dependencies": {"a": ["b", "c"], "c": ["a"]}}, _valid),
        ({"dependencies": {"a": ["b"]}}, _valid),  # no type: non-objects pass
        ({**OBJ, "dependencies": {"a": {"required": ["c"]}}}, _valid),
        ({**OBJ, "dependentRequired": {"a": ["c"]}}, _valid_2020),
        ({**OBJ, "dependentSchemas": {"b": {"properties": {"a": {"minimum": 5}}}}}, _valid_2020),
        ({**OBJ, "not": {"required": ["a", "b"]}}, _valid),
        ({"not": {"required": ["a"]}}, _valid),  # non-objects fail: they meet `required`
        ({**OBJ, "not": {"anyOf": [{"required": ["a"]}, {"required": ["c"]}]}}, _valid),
        ({**OBJ, "not": {}}, _valid),
        ({"properties": {"x": {**OBJ, "dependencies": {"b": ["c"]}}}}, _valid),
        ({"$defs": {"d": {"not": {"required": ["b"]}}}, "items": {"$ref": "#/$defs/d"}}, _valid),
    ],
)
def test_rewrites_accept_exactly_what_the_original_accepts(schema, validate):
    lowered = lower_for_guidance(schema)
    for key in ("dependencies", "dependentRequired", "dependentSchemas", "not"):
        assert key not in str(lowered)
    for instance in [*INSTANCES, [{"a": 1}], [{"b": 1}], {"x": {"b": 1}}]:
        assert validate(lowered, instance) == validate(schema, instance), instance


def test_what_has_no_rewrite_is_left_for_the_backend_to_refuse():
    schema = {
        "not": {"type": "string"},
        "properties": {"dependencies": {"type": "string"}},  # a property name, not a keyword
        "items": {"not": {"enum": [1]}},
    }
    assert lower_for_guidance(schema) == schema
    malformed = {"dependencies": {"a": 3}}
    assert lower_for_guidance(malformed) == malformed


def test_the_input_is_not_changed():
    schema = {**OBJ, "dependencies": {"a": ["b"]}}
    lower_for_guidance(schema)
    assert schema["dependencies"] == {"a": ["b"]}


def test_many_dependencies_in_one_subschema_are_left_for_refusal():
    """llguidance multiplies the alternatives out; past 3 it can fail mid-request."""
    schema = {**OBJ, "dependencies": {name: ["b"] for name in "acdw"}}
    assert lower_for_guidance(schema) == schema
