"""Checks that tests/guided_corpus.py is the corpus it claims to be: enough well-formed requests,
schemas that are valid JSON Schema, render through Kimi's TypeScript tool-declaration encoder and
compile with llguidance, golden example calls that validate (and that llguidance accepts), and a
tool library covering every schema feature guided decoding has to handle."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import llguidance
import pytest
from jsonschema import Draft202012Validator

from kimi_grpc.tool_declaration_ts import encode_tools_to_typescript_style
from tests.guided_corpus import TOOLS, CorpusCase, corpus

# Both the request format (^[A-Za-z0-9_.-]{1,64}$) and Kimi's chat renderer (leading letter or _).
TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
WHITESPACE = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}
FORMATS = {"date-time", "date", "time", "email", "uri", "uuid", "ipv4", "hostname"}
KEYWORDS = {
    "$defs",
    "$ref",
    "anyOf",
    "enum",
    "const",
    "required",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
}
CASES = corpus()


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"]["parameters"]


def _subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``schema`` and every schema nested in it (properties, items, additionalProperties, anyOf
    members and $defs), without following $refs."""
    yield schema
    for key in ("properties", "$defs"):
        for child in schema.get(key, {}).values():
            yield from _subschemas(child)
    for child in schema.get("anyOf", []):
        yield from _subschemas(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key])


def _object_levels(schema: dict[str, Any]) -> int:
    """How many object schemas are nested inside each other, literally (through properties,
    array items and anyOf members, not $refs): 1 for a flat parameters object."""
    children = [*schema.get("properties", {}).values(), *schema.get("anyOf", [])]
    if isinstance(schema.get("items"), dict):
        children.append(schema["items"])
    deepest_child = max((_object_levels(child) for child in children), default=0)
    return deepest_child + (schema.get("type") == "object")


def _resolved(schema: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``#/$defs/X`` reference replaced by its definition."""
    if "$ref" not in schema:
        return schema
    return parameters["$defs"][schema["$ref"].removeprefix("#/$defs/")]


def _library_schemas() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(subschema, its tool's parameters) for every subschema in the library."""
    for tool in TOOLS.values():
        parameters = _parameters(tool)
        for schema in _subschemas(parameters):
            yield schema, parameters


def _deep_sorted(value: Any) -> Any:
    """``value`` with object keys sorted at every level, as Kimi's chat renderer sorts tools."""
    if isinstance(value, dict):
        return {key: _deep_sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_deep_sorted(item) for item in value]
    return value


def _case_tools(case: CorpusCase) -> dict[str, dict[str, Any]]:
    return {tool["function"]["name"]: tool for tool in case.tools}


def test_corpus_is_large_deterministic_and_uniquely_named() -> None:
    assert len(CASES) >= 200
    assert corpus() == CASES
    assert len({case.name for case in CASES}) == len(CASES)


def test_every_case_declares_1_to_30_library_tools_with_unique_names() -> None:
    for case in CASES:
        names = [tool["function"]["name"] for tool in case.tools]
        assert 1 <= len(names) <= 30, case.name
        assert len(set(names)) == len(names), case.name
        for tool in case.tools:
            assert tool == TOOLS[tool["function"]["name"]], case.name


def test_tool_count_spread() -> None:
    counts = [len(case.tools) for case in CASES]
    assert sum(count <= 5 for count in counts) > len(counts) / 2
    assert sum(10 <= count <= 20 for count in counts) >= 20
    assert counts.count(30) >= 5


def test_library_tools_are_well_formed() -> None:
    assert len(TOOLS) >= 45
    for name, tool in TOOLS.items():
        function = tool["function"]
        assert tool["type"] == "function"
        assert function["name"] == name
        assert TOOL_NAME.fullmatch(name), name
        assert function["description"], name
        assert function.get("strict", False) in (True, False), name
        assert _parameters(tool)["type"] == "object", name


def test_parameters_are_valid_draft_2020_12_schemas() -> None:
    for tool in TOOLS.values():
        Draft202012Validator.check_schema(_parameters(tool))


def test_example_calls_name_a_case_tool_and_validate() -> None:
    for case in CASES:
        tools = _case_tools(case)
        assert case.example_calls, case.name
        for name, arguments in case.example_calls:
            assert name in tools, (case.name, name)
            validator = Draft202012Validator(
                _parameters(tools[name]), format_checker=Draft202012Validator.FORMAT_CHECKER
            )
            validator.validate(arguments)


def test_messages_are_a_short_chat_ending_in_a_request_or_a_tool_result() -> None:
    for case in CASES:
        roles = [message["role"] for message in case.messages]
        assert roles in (
            ["user"],
            ["system", "user"],
            ["user", "assistant", "tool"],
            ["system", "user", "assistant", "tool"],
        ), case.name
        if roles[-1] != "tool":
            continue
        assistant, tool_result = case.messages[-2:]
        (call,) = assistant["tool_calls"]
        name = call["function"]["name"]
        assert call["id"] == f"functions.{name}:0"
        assert call["type"] == "function"
        assert tool_result["tool_call_id"] == call["id"]
        assert tool_result["content"]
        arguments = json.loads(call["function"]["arguments"])
        Draft202012Validator(_parameters(_case_tools(case)[name])).validate(arguments)


def test_library_covers_the_schema_features_guided_decoding_must_handle() -> None:
    schemas = list(_library_schemas())
    keywords = {key for schema, _ in schemas for key in schema}
    assert keywords >= KEYWORDS, KEYWORDS - keywords
    assert {schema.get("format") for schema, _ in schemas} >= FORMATS
    assert {"string", "integer", "number", "boolean", "null", "array", "object"} <= {
        schema.get("type") for schema, _ in schemas
    }

    objects = [schema for schema, _ in schemas if schema.get("type") == "object"]
    assert any(schema.get("additionalProperties") is False for schema in objects)
    assert any("additionalProperties" not in schema for schema in objects)
    assert any(set(schema.get("required", [])) < set(schema["properties"]) for schema in objects)
    assert any(
        schema.get("type") == "array"
        and schema["items"].get("type") == "object"
        and {"minItems", "maxItems"} & schema.keys()
        for schema, _ in schemas
    )

    unions = [
        [_resolved(member, parameters) for member in schema["anyOf"]]
        for schema, parameters in schemas
        if "anyOf" in schema
    ]
    assert any({"type": "null"} in members for members in unions)
    assert any(all(m.get("type") == "object" for m in members) for members in unions)

    assert max(_object_levels(_parameters(tool)) for tool in TOOLS.values()) >= 4
    assert sum(_parameters(tool)["properties"] == {} for tool in TOOLS.values()) >= 2
    assert sum(tool["function"].get("strict") is False for tool in TOOLS.values()) >= 2
    assert any("." in name for name in TOOLS)
    assert any("-" in name for name in TOOLS)
    assert any(len(case.tools) == 30 for case in CASES)


def test_every_case_renders_as_kimi_typescript_declarations() -> None:
    for case in CASES:
        rendered = encode_tools_to_typescript_style(case.tools)
        for name in _case_tools(case):
            assert f"type {name} = (_: " in rendered, (case.name, name)


def _grammar(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=WHITESPACE)


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_schema_compiles_with_llguidance(name: str) -> None:
    assert llguidance.LLMatcher.validate_grammar(_grammar(_parameters(TOOLS[name]))) == ""


class _ByteVocabulary:
    """A tokenizer whose tokens are the 256 single bytes (plus EOS), so a matcher can be fed any
    text byte by byte."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([byte]) for byte in range(256)] + [b"<eos>"]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


@pytest.fixture(scope="module")
def byte_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


def test_llguidance_accepts_every_example_call(byte_tokenizer: llguidance.LLTokenizer) -> None:
    """The golden calls are usable in grammar tests: llguidance emits properties in schema order,
    and the examples are written in that order, both as declared and after Kimi's chat renderer
    deep-sorts the tool keys. (Raw UTF-8, since the grammar rejects needless \\u escapes.)"""
    calls = {(name, json.dumps(args)): args for case in CASES for name, args in case.example_calls}
    for (name, _), arguments in sorted(calls.items()):
        schema = _parameters(TOOLS[name])
        for schema_form, arguments_form in [
            (schema, arguments),
            (_deep_sorted(schema), _deep_sorted(arguments)),
        ]:
            matcher = llguidance.LLMatcher(byte_tokenizer, _grammar(schema_form), log_level=0)
            text = json.dumps(arguments_form, ensure_ascii=False)
            assert matcher.consume_tokens(list(text.encode())), (name, matcher.get_error())
            assert matcher.is_accepting(), (name, text)
