"""The oneOf disjointness proof: sound where it says yes, conservative where unsure."""

from __future__ import annotations

import pytest

from splitserve.tokenizer_svc.schema_disjoint import disjoint, one_of_disjoint, one_of_lists

ROOT = {
    "definitions": {
        "name": {"type": "string"},
        "names": {"type": "array", "items": {"$ref": "#/definitions/name"}},
        "a/b": {"type": "null"},
        "loop": {"$ref": "#/definitions/loop"},
    }
}


@pytest.mark.parametrize(
    "a, b",
    [
        ({"type": "string"}, {"type": "null"}),
        ({"type": "string"}, {"type": ["array", "object"]}),
        ({"$ref": "#/definitions/name"}, {"$ref": "#/definitions/names"}),
        ({"$ref": "#/definitions/a~1b"}, {"type": "integer"}),
        ({"const": "x"}, {"enum": ["y", "z"]}),
        ({"enum": [1, 2]}, {"enum": [3, True]}),
        ({"const": 1}, {"type": "string"}),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, {"type": "boolean"}),
        (True, False),
        # one requires "a", the other forbids it
        (
            {"type": "object", "required": ["a"]},
            {"type": "object", "properties": {"b": {}}, "additionalProperties": False},
        ),
        ({"type": "object", "required": ["a"]}, {"type": "object", "properties": {"a": False}}),
        (
            {"type": "object", "required": ["k"], "properties": {"k": {"const": "a"}}},
            {"type": "object", "required": ["k", "v"], "properties": {"k": {"const": "b"}}},
        ),
    ],
)
def test_disjoint_pairs_are_proven(a, b):
    assert disjoint(a, b, ROOT) and disjoint(b, a, ROOT)


@pytest.mark.parametrize(
    "a, b",
    [
        ({"type": "integer"}, {"type": "number", "minimum": 0}),  # 5 matches both
        ({"const": 1}, {"const": 1.0}),  # JSON Schema calls them equal
        ({"type": "string"}, {"minLength": 2}),  # no type: any type
        ({"type": "string"}, {"type": "strng"}),  # an unknown type restricts nothing
        ({"type": "string"}, {"$ref": "http://example.com/x"}),  # not followed
        ({"type": "string"}, {"$ref": "#/definitions/loop"}),  # never resolves
        # "k" is not required in the second branch: {"v": 1} may match both.
        (
            {"type": "object", "required": ["k"], "properties": {"k": {"const": "a"}}},
            {"type": "object", "properties": {"k": {"const": "b"}}},
        ),
        # without type object, a string matches both: required/properties only bind objects
        ({"required": ["a"]}, {"additionalProperties": False}),
        # a patternProperties entry might admit "a"
        (
            {"type": "object", "required": ["a"]},
            {"type": "object", "patternProperties": {"^a$": {}}, "additionalProperties": False},
        ),
        # draft 7 ignores a $ref's siblings, so the sibling type proves nothing.
        ({"$ref": "#/definitions/name", "type": "null"}, {"type": "string"}),
    ],
)
def test_overlapping_or_unprovable_pairs_are_not_claimed(a, b):
    assert not disjoint(a, b, ROOT) and not disjoint(b, a, ROOT)


def test_every_pair_of_branches_must_be_disjoint():
    assert one_of_disjoint([{"type": "string"}, {"type": "null"}, {"type": "array"}], ROOT)
    assert not one_of_disjoint([{"type": "string"}, {"type": "null"}, {"maxLength": 1}], ROOT)
    assert one_of_disjoint([{"type": "string"}], ROOT)


def test_one_of_lists_finds_nested_keywords_and_skips_data():
    schema = {
        "properties": {"a": {"oneOf": [{"type": "string"}]}},
        "items": [{"oneOf": [True, False]}],
        "enum": [{"oneOf": ["data, not a keyword"]}],
        "const": {"oneOf": [1]},
    }
    assert sorted(map(len, one_of_lists(schema))) == [1, 2]
