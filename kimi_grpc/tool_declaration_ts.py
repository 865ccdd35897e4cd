"""Kimi K2.5/K2.6 TypeScript-style tool declarations (``tools_ts_str``, docs/kimi-spec.md 4.4).

Kimi's tokenizer does not show the model OpenAI tool JSON: it renders the (key-sorted) tool list
as a TypeScript namespace and the chat template puts that text in the ``tool_declare`` turn::

    # Tools

    ## functions
    namespace functions {
    // Get the weather.
    type get_weather = (_: {
      // City name
      city: string,
      unit?: "c" | "f"
    }) => any;
    }

The model was trained on exactly this text, so the output must be byte-identical to Moonshot's
``tool_declaration_ts.py`` for every schema that encoder accepts (this is an independent
implementation of that format). Where Moonshot's encoder would crash with an arbitrary exception,
the input is not JSON, or it is malformed in a way Moonshot's code happens to print (a non-string
``name`` or ``type``, a string ``enum``/``required``), :class:`ToolDeclarationError` (a
``ValueError``) is raised, naming the offending path, e.g. ``tools[1].function.parameters``.
Schema features the original rejects (``oneOf``, ``allOf``, a property with only a description,
``$ref`` outside ``#/$defs/...``) are rejected here too, so a request fails the same way it would
with Kimi's own tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolDeclarationError", "encode_tools_to_typescript_style"]

INDENT = "  "
MAX_DEPTH = 100  # JSON nesting limit; keeps every recursive step below far from RecursionError
_STRING_CONSTRAINTS = ("maxLength", "minLength", "pattern")
_NUMBER_CONSTRAINTS = ("maximum", "minimum")
_ARRAY_CONSTRAINTS = ("maxItems", "minItems")
_UNION_MEMBERS = {  # spellings of a JSON-schema ``type: [...]`` list in a TypeScript union
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "{}",
    "array": "Array<any>",
}
_PLAIN_KEY = re.compile(r"[A-Za-z_$][\w$]*")


class ToolDeclarationError(ValueError):
    """A tool list that cannot be encoded; ``path`` names the offending value."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def child_path(path: str, key: str) -> str:
    """``path.key``, or ``path["key"]`` when the key is not identifier-like."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _check_json(value: Any, path: str) -> None:
    """Reject anything that is not plain JSON data (dict with str keys, list, str, number, bool,
    None) or is nested deeper than MAX_DEPTH. Iterative, so hostile nesting cannot overflow."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ToolDeclarationError(where, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                if not isinstance(key, str):
                    raise ToolDeclarationError(where, f"object key {key!r} is not a string")
                stack.append((item, child_path(where, key), depth + 1))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(node))
        elif node is not None and not isinstance(node, str | int | float):
            raise ToolDeclarationError(where, f"{type(node).__name__} is not a JSON value")


def _comment(text: str, indent: str) -> str:
    """Each line of ``text`` as ``indent// line``; empty lines stay empty (no ``//``)."""
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _description(schema: dict[str, Any], path: str) -> str:
    """The schema's description; falsy values (absent, null, "") mean none."""
    value = schema.get("description")
    if not value:
        return ""
    if not isinstance(value, str):
        raise ToolDeclarationError(child_path(path, "description"), "must be a string")
    return value


# ---- parsed schema nodes ---------------------------------------------------------------------
# Parsing and rendering are separate because ``$defs`` are registered in parse order (a $ref may
# only name a definition seen earlier) while fields are rendered required-first, name-sorted.


@dataclass
class _Type:
    """A parsed schema. ``doc`` is the comment block written above the place it is used."""

    description: str
    constraints: list[tuple[str, Any]]  # (keyword, value), sorted by keyword

    def doc(self, indent: str) -> str:
        lines = [_comment(self.description, indent)] if self.description else []
        if self.constraints:
            lines.append(indent + "// " + ", ".join(f"{k}: {v}" for k, v in self.constraints))
        return "".join(line + "\n" for line in lines)

    def ts(self, indent: str) -> str:
        raise NotImplementedError


@dataclass
class _Atom(_Type):
    """Scalars, enums, ``type`` lists and $refs: a fixed text independent of indentation."""

    text: str

    def ts(self, indent: str) -> str:
        return self.text


@dataclass
class _AnyOf(_Type):
    members: list[_Type]

    def ts(self, indent: str) -> str:
        return " | ".join(m.ts(indent) for m in self.members)


@dataclass
class _Array(_Type):
    item: _Type

    def ts(self, indent: str) -> str:
        inner = indent + INDENT
        item_doc = self.item.doc(inner)
        if item_doc:  # a documented item type goes on its own lines
            return f"Array<\n{item_doc}{inner}{self.item.ts(inner)}\n{indent}>"
        return f"Array<{self.item.ts(indent)}>"


@dataclass
class _Field:
    """One property of an object: ``name?: type`` preceded by its comments."""

    name: str
    type: _Type
    optional: bool
    default: Any  # None: no ``// Default:`` line

    def ts(self, indent: str) -> str:
        out = self.type.doc(indent)
        if self.default is not None:
            value = self.default
            shown = (
                repr(value)
                if isinstance(value, int | float)
                else json.dumps(value, ensure_ascii=False)
            )
            out += f"{indent}// Default: {shown}\n"
        mark = "?" if self.optional else ""
        return f"{out}{indent}{self.name}{mark}: {self.type.ts(indent)}"


@dataclass
class _Object(_Type):
    fields: list[_Field] = field(default_factory=list)
    extra: _Type | bool | None = None  # additionalProperties: schema, true/false, or absent

    def ts(self, indent: str) -> str:
        inner = indent + INDENT
        ordered = sorted(self.fields, key=lambda f: (f.optional, f.name))  # required first
        lines = [f.ts(inner) for f in ordered]
        if self.extra is not None:
            if isinstance(self.extra, bool):
                value = "any" if self.extra else "never"
            else:
                value = self.extra.ts(inner)
            lines.append(f"{inner}[k: string]: {value}")
        if not lines:
            return "{}"
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"


@dataclass
class _Context:
    """Per-function parse state: registered ``$defs`` (name -> (schema, path)) in registration
    order, and whether some ``$ref: "#"`` points at the parameters object itself."""

    defs: dict[str, tuple[Any, str]] = field(default_factory=dict)
    self_ref: bool = False


def _parse(schema: Any, path: str, ctx: _Context) -> _Type:
    if isinstance(schema, bool):  # JSON schema `true` accepts anything; `false` nothing
        return _Atom("", [], "any" if schema else "null")
    if not isinstance(schema, dict):
        raise ToolDeclarationError(path, "a JSON schema must be an object or a boolean")
    if "$ref" in schema:
        return _parse_ref(schema, path, ctx)
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list):
            raise ToolDeclarationError(child_path(path, "anyOf"), "must be a list of schemas")
        members = [_parse(s, f"{path}.anyOf[{i}]", ctx) for i, s in enumerate(options)]
        return _AnyOf(_description(schema, path), [], members)
    if "enum" in schema:
        return _parse_enum(schema, path)
    if "type" not in schema:
        if not schema:
            return _Atom("", [], "any")
        raise ToolDeclarationError(
            path, "unsupported schema: needs 'type', 'enum', 'anyOf' or '$ref'"
        )
    kind = schema["type"]
    if isinstance(kind, list):
        names = []
        for i, name in enumerate(kind):
            if not isinstance(name, str) or name not in _UNION_MEMBERS:
                raise ToolDeclarationError(f"{path}.type[{i}]", f"unknown type {name!r}")
            names.append(_UNION_MEMBERS[name])
        return _Atom(_description(schema, path), [], " | ".join(names))
    if not isinstance(kind, str):
        raise ToolDeclarationError(child_path(path, "type"), "must be a string or a list")
    if kind == "object":
        return _parse_object(schema, path, ctx)
    if kind == "array":
        item_schema = schema.get("items")
        item = _parse(item_schema, f"{path}.items", ctx) if item_schema else _Atom("", [], "any")
        return _Array(_description(schema, path), _constraints(schema, _ARRAY_CONSTRAINTS), item)
    allowed = {"string": _STRING_CONSTRAINTS, "number": _NUMBER_CONSTRAINTS}
    allowed["integer"] = _NUMBER_CONSTRAINTS
    constraints = _constraints(schema, allowed.get(kind, ()))
    return _Atom(_description(schema, path), constraints, "number" if kind == "integer" else kind)


def _constraints(schema: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    return sorted((k, schema[k]) for k in keys if k in schema)


def _parse_ref(schema: dict[str, Any], path: str, ctx: _Context) -> _Type:
    ref = schema["$ref"]
    where = child_path(path, "$ref")
    if not isinstance(ref, str):
        raise ToolDeclarationError(where, "must be a string")
    if ref == "#":
        ctx.self_ref = True
        name = "parameters"  # the self-referencing parameters become `interface parameters`
    elif ref.startswith("#/$defs/"):
        name = ref.split("/")[-1]
        if name not in ctx.defs:
            raise ToolDeclarationError(where, f"reference {ref!r} not found in $defs seen so far")
        target, target_path = ctx.defs[name]
        if not isinstance(target, dict):
            raise ToolDeclarationError(target_path, "a $defs entry must be an object")
        if target.get("$self_ref", False):  # Moonshot's internal self-reference marker
            name = "parameters"
    else:
        raise ToolDeclarationError(where, f"unsupported reference {ref!r} (use '#' or '#/$defs/…')")
    return _Atom(_description(schema, path), [], name)


def _parse_enum(schema: dict[str, Any], path: str) -> _Type:
    values = schema["enum"]
    if not isinstance(values, list):
        raise ToolDeclarationError(child_path(path, "enum"), "must be a list")
    if "type" in schema:  # values must agree with a declared (optionally nullable) scalar type
        kind = schema["type"]
        if isinstance(kind, list):
            if len(kind) == 1:
                kind = kind[0]
            elif len(kind) == 2 and "null" in kind:
                kind = kind[0] if kind[0] != "null" else kind[1]
            else:
                raise ToolDeclarationError(f"{path}.type", f"enum type {kind!r} is not supported")
        checks = {"string": str, "number": int | float, "integer": int, "boolean": bool}
        want = checks.get(kind) if isinstance(kind, str) else None
        for i, value in enumerate(values):
            if want is not None and value is not None and not isinstance(value, want):
                raise ToolDeclarationError(f"{path}.enum[{i}]", f"{value!r} is not a {kind}")
    text = " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in values)
    return _Atom(_description(schema, path), [], text)


def _parse_object(schema: dict[str, Any], path: str, ctx: _Context) -> _Object:
    obj = _Object(_description(schema, path), [])
    if not schema:
        return obj
    defs = schema.get("$defs")
    if defs:
        if not isinstance(defs, dict):
            raise ToolDeclarationError(child_path(path, "$defs"), "must be an object")
        defs_path = child_path(path, "$defs")
        for name, sub in defs.items():
            ctx.defs[name] = (sub, child_path(defs_path, name))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        obj.extra = _parse(extra, child_path(path, "additionalProperties"), ctx)
    elif extra is None or isinstance(extra, bool):
        obj.extra = extra
    else:
        where = child_path(path, "additionalProperties")
        raise ToolDeclarationError(where, "must be a boolean or a schema")
    if "properties" not in schema:
        return obj
    props = schema["properties"]
    required = schema.get("required", [])
    if not isinstance(props, dict):
        raise ToolDeclarationError(child_path(path, "properties"), "must be an object")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolDeclarationError(child_path(path, "required"), "must be a list of strings")
    props_path = child_path(path, "properties")
    for name, sub in props.items():
        sub_type = _parse(sub, child_path(props_path, name), ctx)
        default = sub.get("default") if isinstance(sub, dict) else None
        obj.fields.append(_Field(name, sub_type, name not in required, default))
    return obj


def _function_ts(function: dict[str, Any], path: str) -> str:
    """One function: its ``$defs`` interfaces, its description comment, its ``type`` line."""
    ctx = _Context()
    params = function.get("parameters") or {}
    params_path = f"{path}.parameters"
    if not isinstance(params, dict):
        raise ToolDeclarationError(params_path, "must be a JSON schema object")
    root = _parse_object(params, params_path, ctx)
    interfaces = []
    self_ref = ctx.self_ref  # only a "#" reached from the parameters counts, not one in $defs
    if self_ref:  # fields in declaration order here, as in Moonshot's encoder
        body = ",\n".join(f.ts(INDENT) for f in root.fields)
        interfaces.append("interface parameters {" + (f"\n{body}\n" if body else "") + "}")
    for name, (schema, def_path) in list(ctx.defs.items()):  # defs found here are not listed
        parsed = _parse(schema, def_path, ctx)
        if not isinstance(schema, dict):
            raise ToolDeclarationError(def_path, "a $defs entry must be an object")
        text = _description(schema, def_path)
        doc = _comment(text, "") + "\n" if text else ""
        interfaces.append(f"{doc}interface {name} {parsed.ts('')}")
    name = function.get("name", "function")
    if not isinstance(name, str):
        raise ToolDeclarationError(f"{path}.name", "must be a string")
    signature = "parameters" if self_ref else root.ts("")
    description = _description(function, path)
    parts = ["\n".join(interfaces), _comment(description, "") if description else ""]
    parts.append(f"type {name} = (_: {signature}) => any;")
    return "\n".join(p for p in parts if p)


def encode_tools_to_typescript_style(tools: list[dict[str, Any]] | None) -> str:
    """Render OpenAI-style tools (``{"type": "function", "function": {...}}``) as Kimi's
    TypeScript declaration. Tools of other types and empty ``function`` objects are skipped; no
    functions at all gives "". Raises ToolDeclarationError (a ValueError) for invalid input."""
    if not tools:
        return ""
    if not isinstance(tools, list):
        raise ToolDeclarationError("tools", "must be a list")
    _check_json(tools, "tools")
    blocks = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ToolDeclarationError(where, "must be an object")
        if tool.get("type") != "function":
            continue
        function = tool.get("function")
        if not function:
            continue
        if not isinstance(function, dict):
            raise ToolDeclarationError(f"{where}.function", "must be an object")
        blocks.append(_function_ts(function, f"{where}.function"))
    if not blocks:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(blocks) + "\n}\n"
