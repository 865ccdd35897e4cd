"""Exact-output and robustness tests for kimi_grpc.tool_declaration_ts (Kimi K2.5/K2.6
``tools_ts_str``, docs/kimi-spec.md 4.4). Expected text is written by hand in Moonshot's format,
quirks included (Python reprs such as ``None``/``True``/``False``, ``interface X "a" | "b"``).

CASES holds ``=== name`` sections: the tool list as JSON, a ``---`` line, then the expected
function blocks (what goes between ``namespace functions {`` and ``}``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_grpc.tool_declaration_ts import ToolDeclarationError, encode_tools_to_typescript_style

HEAD = "# Tools\n\n## functions\nnamespace functions {\n"
TAIL = "\n}\n"
CASES_TEXT = r"""
=== simple
[{"type": "function", "function": {"name": "get_weather", "description": "Get the weather.",
  "parameters": {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string", "description": "City name"},
    "days": {"type": "integer", "description": "Forecast days"}}}}}]
---
// Get the weather.
type get_weather = (_: {
  // City name
  city: string,
  // Forecast days
  days?: number
}) => any;
=== nested_object
[{"type": "function", "function": {"name": "create", "parameters": {"type": "object",
  "required": ["user"], "properties": {"user": {"type": "object", "description": "The user",
    "required": ["name"], "properties": {"name": {"type": "string"},
      "address": {"type": "object", "required": ["zip", "city"],
        "properties": {"zip": {"type": "string"}, "city": {"type": "string"}}}}}}}}}]
---
type create = (_: {
  // The user
  user: {
    name: string,
    address?: {
      city: string,
      zip: string
    }
  }
}) => any;
=== enum
[{"type": "function", "function": {"name": "set_mode", "parameters": {"type": "object",
  "required": ["level"], "properties": {
    "mode": {"type": "string", "enum": ["fast", "slow"], "description": "Speed",
             "default": "fast"},
    "level": {"type": "integer", "enum": [1, 2, 3]},
    "flag": {"enum": ["on", null, true]}}}}}]
---
type set_mode = (_: {
  level: 1 | 2 | 3,
  flag?: "on" | None | True,
  // Speed
  // Default: "fast"
  mode?: "fast" | "slow"
}) => any;
=== any_of_and_type_lists
[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
  "required": ["id"], "properties": {
    "id": {"anyOf": [{"type": "string"}, {"type": "integer"}], "description": "Id"},
    "tag": {"type": ["string", "null"]},
    "extra": {"anyOf": [{"type": "object", "properties": {"k": {"type": "string"}},
                         "required": ["k"]}, {"type": "null"}]},
    "blob": {"type": ["object", "array", "integer"]}}}}}]
---
type lookup = (_: {
  // Id
  id: string | number,
  blob?: {} | Array<any> | number,
  extra?: {
    k: string
  } | null,
  tag?: string | null
}) => any;
=== array_of_objects
[{"type": "function", "function": {"name": "add_items", "parameters": {"type": "object",
  "required": ["items"], "properties": {
    "items": {"type": "array", "description": "Items to add", "minItems": 1,
              "items": {"type": "object", "description": "One item", "required": ["sku"],
                        "properties": {"sku": {"type": "string"},
                                       "qty": {"type": "integer", "minimum": 1}}}},
    "tags": {"type": "array", "items": {"type": "string"}},
    "any": {"type": "array"}}}}}]
---
type add_items = (_: {
  // Items to add
  // minItems: 1
  items: Array<
    // One item
    {
      sku: string,
      // minimum: 1
      qty?: number
    }
  >,
  any?: Array<any>,
  tags?: Array<string>
}) => any;
=== defs_and_refs
[{"type": "function", "function": {"name": "draw", "description": "Draw shapes.",
  "parameters": {"type": "object", "required": ["points"],
    "$defs": {"Point": {"type": "object", "description": "A point", "required": ["x", "y"],
                        "properties": {"x": {"type": "number"}, "y": {"type": "number"}}},
              "Color": {"type": "string", "enum": ["red", "blue"]}},
    "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/Point"}},
                   "color": {"$ref": "#/$defs/Color", "description": "Fill"}}}}}]
---
// A point
interface Point {
  x: number,
  y: number
}
interface Color "red" | "blue"
// Draw shapes.
type draw = (_: {
  points: Array<Point>,
  // Fill
  color?: Color
}) => any;
=== self_reference
[{"type": "function", "function": {"name": "tree", "parameters": {"type": "object",
  "required": ["value"], "properties": {"value": {"type": "string"},
    "children": {"type": "array", "items": {"$ref": "#"}}}}}}]
---
interface parameters {
  value: string,
  children?: Array<parameters>
}
type tree = (_: parameters) => any;
=== defaults
[{"type": "function", "function": {"name": "cfg", "parameters": {"type": "object",
  "properties": {"a": {"type": "integer", "default": 3}, "b": {"type": "number", "default": 0.5},
    "c": {"type": "boolean", "default": false}, "d": {"type": "string", "default": "x\"y"},
    "e": {"type": "array", "items": {"type": "string"}, "default": ["p", "中"]},
    "f": {"type": "string", "default": null}}}}}]
---
type cfg = (_: {
  // Default: 3
  a?: number,
  // Default: 0.5
  b?: number,
  // Default: False
  c?: boolean,
  // Default: "x\"y"
  d?: string,
  // Default: ["p", "中"]
  e?: Array<string>,
  f?: string
}) => any;
=== constraints
[{"type": "function", "function": {"name": "c", "parameters": {"type": "object",
  "required": ["s", "n", "l"], "properties": {
    "s": {"type": "string", "pattern": "^[a-z]+$", "minLength": 1, "maxLength": 8,
          "description": "Slug"},
    "n": {"type": "number", "minimum": 0, "maximum": 1.5},
    "l": {"type": "array", "maxItems": 3, "minItems": 1,
          "items": {"type": "integer", "maximum": 9}},
    "b": {"type": "boolean", "maxLength": 3}}}}}]
---
type c = (_: {
  // maxItems: 3, minItems: 1
  l: Array<
    // maximum: 9
    number
  >,
  // maximum: 1.5, minimum: 0
  n: number,
  // Slug
  // maxLength: 8, minLength: 1, pattern: ^[a-z]+$
  s: string,
  b?: boolean
}) => any;
=== no_parameters_and_other_tool_types
[{"type": "function", "function": {"name": "ping"}},
 {"type": "function", "function": {"name": "noop", "description": "Nothing.", "parameters": {}}},
 {"type": "builtin_function", "function": {"name": "$web_search"}},
 {"type": "function", "function": {"name": "empty", "parameters": {"type": "object",
   "properties": {}, "required": []}}},
 {"type": "function", "function": {}}]
---
type ping = (_: {}) => any;
// Nothing.
type noop = (_: {}) => any;
type empty = (_: {}) => any;
=== multi_line_description
[{"type": "function", "function": {"name": "m", "description": "First line.\n\nThird line.",
  "parameters": {"type": "object", "required": ["q"],
    "properties": {"q": {"type": "string", "description": "query\nsecond"}}}}}]
---
// First line.

// Third line.
type m = (_: {
  // query
  // second
  q: string
}) => any;
=== additional_properties
[{"type": "function", "function": {"name": "kv", "parameters": {"type": "object",
  "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "meta": {"type": "object", "additionalProperties": true},
    "strict": {"type": "object", "properties": {"a": {"type": "string"}},
               "additionalProperties": false},
    "free": {}}}}}]
---
type kv = (_: {
  free?: any,
  labels?: {
    [k: string]: string
  },
  meta?: {
    [k: string]: any
  },
  strict?: {
    a?: string,
    [k: string]: never
  }
}) => any;
"""


def _parse_cases(text: str) -> dict[str, tuple[list[dict[str, Any]], str]]:
    cases = {}
    for section in text.split("\n=== ")[1:]:
        name, rest = section.split("\n", 1)
        tools, body = rest.split("\n---\n")
        cases[name] = (json.loads(tools), body.rstrip("\n"))
    return cases


CASES = _parse_cases(CASES_TEXT)


def fn(name: Any, parameters: Any = None, description: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    if description is not None:
        body["description"] = description
    if parameters is not None:
        body["parameters"] = parameters
    return {"type": "function", "function": body}


def obj(properties: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **kw}


def test_all_cases_parsed() -> None:
    assert len(CASES) == 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_output(case: str) -> None:
    tools, body = CASES[case]
    assert encode_tools_to_typescript_style(tools) == HEAD + body + TAIL


def test_several_tools_are_joined_in_list_order() -> None:
    tools = [*CASES["simple"][0], *CASES["self_reference"][0]]
    want = HEAD + CASES["simple"][1] + "\n" + CASES["self_reference"][1] + TAIL
    assert encode_tools_to_typescript_style(tools) == want


@pytest.mark.parametrize("tools", [None, [], [{"type": "retrieval"}], [fn("x") | {"type": "x"}]])
def test_no_functions_gives_empty_string(tools: Any) -> None:
    assert encode_tools_to_typescript_style(tools) == ""


P = "tools[0].function.parameters"
BAD: list[tuple[Any, str]] = [
    ({"name": "f"}, "tools"),
    ([1], "tools[0]"),
    ([{"type": "function", "function": "f"}], "tools[0].function"),
    ([fn("f", [1])], P),
    ([fn("ok"), fn("f", "x")], "tools[1].function.parameters"),
    ([fn(5)], "tools[0].function.name"),
    ([fn("f", description=5)], "tools[0].function.description"),
    ([fn("f", {"type": "object", "properties": [1]})], f"{P}.properties"),
    ([fn("f", {"type": "object", "properties": {}, "required": "a"})], f"{P}.required"),
    ([fn("f", obj({"city": {"description": "no type"}}))], f"{P}.properties.city"),
    ([fn("f", obj({"x": {"oneOf": [{"type": "string"}]}}))], f"{P}.properties.x"),
    ([fn("f", obj({"x": {"type": ["string", "foo"]}}))], f"{P}.properties.x.type[1]"),
    ([fn("f", obj({"x": {"type": 5}}))], f"{P}.properties.x.type"),
    ([fn("f", obj({"x": {"enum": "ab"}}))], f"{P}.properties.x.enum"),
    ([fn("f", obj({"x": {"type": "string", "enum": ["a", 1]}}))], f"{P}.properties.x.enum[1]"),
    ([fn("f", obj({"x": {"type": ["a", "b"], "enum": ["a"]}}))], f"{P}.properties.x.type"),
    ([fn("f", obj({"x": {"$ref": "#/$defs/Missing"}}))], f"{P}.properties.x.$ref"),
    ([fn("f", obj({"x": {"$ref": "#/definitions/X"}}))], f"{P}.properties.x.$ref"),
    ([fn("f", obj({"x": {"$ref": 3}}))], f"{P}.properties.x.$ref"),
    ([fn("f", obj({}, additionalProperties="yes"))], f"{P}.additionalProperties"),
    ([fn("f", obj({"x": {"anyOf": {"type": "string"}}}))], f"{P}.properties.x.anyOf"),
    ([fn("f", obj({"x": {"anyOf": ["string"]}}))], f"{P}.properties.x.anyOf[0]"),
    ([fn("f", obj({"x": {"type": "array", "items": "string"}}))], f"{P}.properties.x.items"),
    (
        [fn("f", obj({"x": {"type": "string", "description": ["d"]}}))],
        f"{P}.properties.x.description",
    ),
    ([fn("f", obj({"a b": {"type": "string", "enum": 1}}))], f'{P}.properties["a b"].enum'),
    ([fn("f", {"type": "object", "$defs": [1]})], f"{P}.$defs"),
    ([fn("f", {"$defs": {"X": True}, "properties": {"x": {"$ref": "#/$defs/X"}}})], f"{P}.$defs.X"),
    ([fn("f", {"$defs": {"X": 3}, "properties": {}})], f"{P}.$defs.X"),
    ([fn("f", obj({"x": {"type": "string", "default": {1, 2}}}))], f"{P}.properties.x.default"),
    ([fn("f", obj({"x": {1: "a"}}))], f"{P}.properties.x"),
]


@pytest.mark.parametrize(("tools", "path"), BAD)
def test_invalid_input_raises_value_error_naming_the_path(tools: Any, path: str) -> None:
    with pytest.raises(ToolDeclarationError) as info:
        encode_tools_to_typescript_style(tools)
    assert isinstance(info.value, ValueError)
    assert info.value.path == path
    assert str(info.value).startswith(path + ": ")


def test_hostile_nesting_is_a_value_error() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ToolDeclarationError, match="nested deeper"):
        encode_tools_to_typescript_style([fn("f", obj({"x": deep}))])
    cyclic: dict[str, Any] = {"type": "object"}
    cyclic["properties"] = {"me": cyclic}
    with pytest.raises(ToolDeclarationError):
        encode_tools_to_typescript_style([fn("f", cyclic)])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "properties", "items", "enum", "anyOf", "$ref", "$defs"])
            | st.sampled_from(["required", "additionalProperties", "default", "description"])
            | st.text(max_size=3),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)
SCHEMA_TYPES = st.sampled_from(["object", "array", "string", "integer", ["string", "null"], 3])
PARAMETERS = st.fixed_dictionaries(
    {"type": SCHEMA_TYPES},
    optional={
        "properties": st.dictionaries(st.text(max_size=2), JSON),
        "required": JSON,
        "$defs": JSON,
        "additionalProperties": JSON,
    },
)
FUNCTION = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=3) | JSON,
        "description": JSON,
        "parameters": JSON | PARAMETERS,
    },
)
TOOL_LISTS = st.lists(
    st.fixed_dictionaries({"type": st.just("function"), "function": FUNCTION}), max_size=3
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON | st.lists(JSON, max_size=3) | TOOL_LISTS)
def test_arbitrary_json_gives_text_or_value_error(tools: Any) -> None:
    try:
        out = encode_tools_to_typescript_style(tools)
    except ToolDeclarationError as exc:
        assert exc.path.startswith("tools")
    else:
        assert isinstance(out, str)
