"""Replies held to a JSON Schema (awq_edge/json_schema.py): every text the grammar lets through is
valid under the schema by a real validator (jsonschema), the schema's own instances pass, the
subset's edges are one-line refusals, and the real SmolLM2 engine's replies validate."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from awq_edge.errors import UserError
from awq_edge.json_schema import NO_ARGUMENTS, GrammarPrefix, schema_grammar, tool_calls_grammar

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer"},
    "height": {"type": ["number", "null"]},
    "role": {"enum": ["pilot", "robot", 3, None]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "home": {"$ref": "#/$defs/place"}},
    "required": ["name", "role"], "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"const": "00100"}},
                        "required": ["city"]}}}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
    "value": {"type": "boolean"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["value", "children"], "additionalProperties": False}}}
SCHEMAS = {
    "person": (PERSON, [{"name": "Ada", "role": "pilot"},
                        {"name": "R2", "age": -3, "height": 0.96, "role": None, "tags": ["a", "b"],
                         "home": {"city": "Naboo", "zip": "00100"}}]),
    "tree": (TREE, [{"value": True, "children": [{"value": False, "children": []}]}]),
    "tuple": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False,
               "minItems": 1}, [[1], [2, "x"]]),
    "bounded list": ({"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
                      "minItems": 2, "maxItems": 4}, [[1, True], [0, 1, 2, False]]),
    "free map": ({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"a": 1, "b": -2}]),
    "anything": ({}, [[1, {"a": None}], "text", 2.5e-3, {"k": [True]}]),
    "nullable string": ({"anyOf": [{"type": "string"}, {"type": "null"}], "title": "x", "default": None},
                        ["é ü", None]),
    # an enum's values of another type, and a branch of "true" beside a type, cannot let that type go
    "typed enum": ({"type": ["string", "null"], "enum": ["a", 1, None, 2.5]}, ["a", None]),
    "combinator and type": ({"type": "object", "anyOf": [True, {"properties": {"x": {"type": "integer"}},
                                                                "required": ["x"]}]}, [{}, {"x": 1}]),
}


def random_text(prefix, rng: random.Random, limit: int = 400) -> str | None:
    """A random walk through the grammar: each byte one that may come next, leaning to closing
    bytes as it gets long; it stops where the text may end (half the time); None past limit."""
    text = bytearray()
    while len(text) < limit:
        if prefix.done and (rng.random() < 0.5 or not any(prefix.copy().feed(b) for b in range(256))):
            return text.decode()
        nexts = [b for b in range(256) if prefix.copy().feed(b)]
        closing = [b for b in nexts if b in b'"]}0123456789tfn,']
        byte = rng.choice(closing if closing and rng.random() < len(text) / limit + 0.3 else nexts)
        assert prefix.feed(byte)
        text.append(byte)
    return None


@pytest.mark.parametrize("name", SCHEMAS)
def test_what_the_grammar_lets_through_is_valid_and_the_schemas_instances_pass(name):
    schema, instances = SCHEMAS[name]
    grammar = schema_grammar(schema)
    rng, made = random.Random(name), 0
    for _ in range(60):
        text = random_text(GrammarPrefix(*grammar), rng)
        if text is not None:
            jsonschema.validate(json.loads(text), schema)
            made += 1
    assert made >= 20
    for instance in instances:
        jsonschema.validate(instance, schema)  # (the test's own instances are right)
        for indent in (None, 2):
            prefix = GrammarPrefix(*grammar)
            text = json.dumps(instance, indent=indent, ensure_ascii=False)
            assert prefix.feed_all(text.encode()) and prefix.done, text


def test_the_grammar_refuses_what_the_schema_refuses():
    person = schema_grammar(PERSON)
    for text in ('{"role": "pilot"}',                    # required name missing
                 '{"name": "", "role": "pilot"}',        # minLength 1
                 '{"name": "Ada", "role": "cook"}',      # not in the enum
                 '{"name": "Ada", "role": 3, "x": 1}',   # no additional properties
                 '{"name": "Ada", "role": 3, "tags": ["a", "b", "c", "d"]}',  # maxItems 3
                 '{"name": "Ada", "role": 3, "age": 1.5}',                    # an integer
                 '{"name": "Ada", "role": 3, "home": {"zip": "00100"}}'):     # the $ref's required city
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(text), PERSON)
        prefix = GrammarPrefix(*person)
        assert not (prefix.feed_all(text.encode()) and prefix.done), text


def test_string_lengths_count_characters_as_a_reader_does():
    """A UTF-16 surrogate pair escape is one character to json.loads, a lone low surrogate one
    more; minLength/maxLength count them so. A lone high surrogate is never written."""
    grammar = schema_grammar({"type": "string", "minLength": 2, "maxLength": 2})
    for text in (r'"\ud83d\ude00"', r'"\ud83d\ude00x"', r'"ab"', r'"\u00e9b"', r'"\ude00\ude00"',
                 r'"\uD83D\uDE00\uDE00"', r'"\u1234\uDEAD"', '"é😀"', r'"\ud83dx"'):
        prefix = GrammarPrefix(*grammar)
        written = prefix.feed_all(text.encode()) and prefix.done
        lone_high = "\\ud83dx" in text
        assert written == (len(json.loads(text)) == 2 and not lone_high), text


def test_a_free_key_is_none_of_the_listed_properties():
    """With both properties and additionalProperties a free key is never a listed name (the object
    would hold that key twice, and a reader keeps one of the two): every key of up to 3 characters
    over an alphabet of the names' characters, those sharing their UTF-8 lead bytes (é, è) and one
    of three bytes, goes through as a free key exactly when it is not listed; no escapes there."""
    import itertools

    names = ["a", "ab", "é", "", "b€"]
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names},
              "additionalProperties": {"type": "string"}}
    grammar = schema_grammar(schema)
    for size in range(4):
        for key in map("".join, itertools.product("abéè€", repeat=size)):
            prefix = GrammarPrefix(*grammar)
            free = prefix.feed_all(json.dumps({key: "x"}, ensure_ascii=False).encode()) and prefix.done
            assert free == (key not in names), key
    listed_then_free = GrammarPrefix(*grammar)
    assert listed_then_free.feed_all('{"a": 1, "é": 2, "zz": "q"}'.encode()) and listed_then_free.done
    assert not GrammarPrefix(*grammar).feed_all(b'{"\\n": "x"}')
    assert not GrammarPrefix(*grammar).feed_all(b'{"a": 1, "a": "x"}')


@pytest.mark.parametrize("schema, needle", [
    ({"type": "integer", "minimum": 0}, "'minimum'"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}, "#/properties/a: .*'pattern'"),
    ({"type": "thing"}, "not one of object, array"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "only references into this schema"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is more than"),
    ({"type": "array", "maxItems": 10 ** 6}, "more than 256"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b' is not among its properties"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf of several is not supported"),
    ([1, 2], "must be an object or true"),
    ({"$ref": "#/$defs/a", "type": "string", "$defs": {"a": {}}}, "'type' beside \\$ref"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "'maxLength' beside an enum"),
    ({"type": "string", "anyOf": [{"type": "integer"}]}, "anyOf/0: its 'type' differs"),
    ({"type": "string", "const": 3}, "no value of its enum or const can pass its type"),
])
def test_a_schema_outside_the_subset_is_one_line_naming_why(schema, needle):
    import re

    with pytest.raises(UserError) as e:
        schema_grammar(schema)
    assert re.search(needle, str(e.value)) and "\n" not in str(e.value), str(e.value)


def test_hostile_schemas_are_bounded():
    """A request's schema is untrusted: a huge choice is refused in one line, and an ambiguous one
    (the same value twice in an anyOf, nested: parses double at each level) stays fast and sound."""
    import time

    with pytest.raises(UserError, match="a choice of 5000"):
        schema_grammar({"enum": list(range(5000))})
    doubling = {"$defs": {"a": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/a"}},
                                          {"type": "array", "items": {"$ref": "#/$defs/a"}}]}}, "$ref": "#/$defs/a"}
    prefix, started = GrammarPrefix(*schema_grammar(doubling)), time.perf_counter()
    text = b"[" * 40 + b"]" * 40
    assert prefix.feed_all(text) and prefix.done and time.perf_counter() - started < 20
    jsonschema.validate(json.loads(text), doubling)


def test_tool_calls_grammar_is_an_array_of_calls_each_by_its_tools_parameters():
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
    grammar = tool_calls_grammar({"get_weather": weather, "get_time": NO_ARGUMENTS})
    calls_schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": weather},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "get_time"},
                                          "arguments": {"type": "object", "maxProperties": 0}},
         "required": ["name", "arguments"], "additionalProperties": False}]}}
    rng = random.Random(0)
    for _ in range(30):
        text = random_text(GrammarPrefix(*grammar), rng)
        if text is not None:
            jsonschema.validate(json.loads(text), calls_schema)
    prefix = GrammarPrefix(*grammar)
    assert prefix.feed_all(b'[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                           b'{"name": "get_time", "arguments": {}}]') and prefix.done
    for text in (b"[]", b'[{"name": "get_date"', b'[{"name": "get_time", "arguments": {"x": 1}}]'):
        prefix = GrammarPrefix(*grammar)
        assert not (prefix.feed_all(text) and prefix.done), text
    with pytest.raises(UserError, match="tool 'bad'"):
        tool_calls_grammar({"bad": {"type": "string", "format": "x", "pattern": "y"}})


@pytest.fixture(scope="module")
def engine(engine_dir):
    from awq_edge.engine import Engine

    return Engine.load(engine_dir, max_context=1024)


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string"},
                                         "population": {"type": "integer"},
                                         "size": {"enum": ["small", "medium", "large"]}},
        "required": ["city", "country", "population", "size"], "additionalProperties": False}


@pytest.mark.parametrize("prompt", ["Tell me about Paris.", "Write a haiku about rain."])
def test_the_engines_replies_are_valid_under_the_schema(engine, prompt):
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 1}):
        text = engine.generate(prompt, max_new_tokens=160, json_schema=CITY, **sampling)
        assert engine.last_stats.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), CITY)
    with pytest.raises(UserError, match="'minimum'"):
        engine.generate(prompt, json_schema={"type": "integer", "minimum": 1})
