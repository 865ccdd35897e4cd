"""The Kimi tool-call grammar: what an assistant turn may say after its reasoning.

Written as Lark for llguidance. The grammar covers only the suffix after reasoning (the engine's
:class:`~kimi_grpc.guided.guide.Guide` owns the thinking section), and reads::

    auto                    body: TEXT | TEXT section
    required                body: section
    named NAME              body: section, with exactly one call, of NAME
    auto + response format  body: json | section
    response format only    body: json

    section: <|tool_calls_section_begin|> call+ <|tool_calls_section_end|>    (call once if not
                                                                               parallel_tool_calls)
    call:    <|tool_call_begin|> "functions.NAME:" IDX <|tool_call_argument_begin|>
             %json{NAME's parameters} <|tool_call_end|>       (one alternative per declared tool)

Markers are special tokens named in the grammar (``<|name|>``), never their byte spelling, so no
marker can occur inside free text or a JSON string, and free text cannot open a call on its own.
EOS is allowed only where the grammar accepts (the engine adds the request's stop ids).

Schemas: each tool's ``parameters`` constrains its arguments as declared, with two adjustments
that make the constraint match what the model is shown: ``properties`` are ordered required
first, then by name, as the Kimi TypeScript declarations list them (llguidance emits properties
in schema order; the model writes them in the order it was shown, we assume), and
a schema without ``type`` is an object (arguments are always a JSON object). ``strict: false``
tools get ``{"type": "object"}``; ``strict: true`` makes unspecified ``additionalProperties``
false (OpenAI's strict mode). JSON whitespace is capped at :data:`MAX_JSON_WHITESPACE` characters
per gap so greedy decoding cannot loop on it. A schema using keywords the engine cannot enforce
(``not``, ``if``, an unknown ``format``, a lookaround ``pattern``...) compiles leniently (those
keywords unenforced) and is reported in :attr:`ToolGrammar.lenient`, for the caller to count and
log; one that is not a schema at all (a wrong ``type``) is a :class:`GrammarError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kimi_grpc.guided.backend import CompiledGrammar, GrammarBackend, GrammarError

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
MAX_JSON_WHITESPACE = 32
WHITESPACE_PATTERN = rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"
MAX_CALL_INDEX_DIGITS = 4
_DATA_KEYWORDS = frozenset(("enum", "const", "default", "examples"))  # values, not schemas
_NAME_MAPS = frozenset(("properties", "patternProperties", "$defs", "definitions"))
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolGrammar:
    text: str  # the Lark grammar
    lenient: list[tuple[str, list[str]]]  # (field, problems) of schemas compiled leniently
    compiled: CompiledGrammar


def _map_schemas(node: Any, visit: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A copy of a schema with ``visit`` applied to every (sub)schema object, innermost first.
    Values of data keywords (``enum``, ``const``...) are copied as they are; the values of name
    maps (``properties``, ``$defs``...) are schemas whatever their names."""
    if isinstance(node, list):
        return [_map_schemas(v, visit) for v in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _NAME_MAPS and isinstance(value, Mapping):
            out[key] = {name: _map_schemas(sub, visit) for name, sub in value.items()}
        else:
            out[key] = _map_schemas(value, visit)
    return visit(out)


def _model_order(schema: dict[str, Any]) -> dict[str, Any]:
    """``properties`` in the order the model is shown them: required first, then by name
    (``tool_declaration_ts`` renders fields that way)."""
    props, required = schema.get("properties"), schema.get("required")
    if isinstance(props, Mapping):
        required = set(required) if isinstance(required, list) else set()
        order = sorted(props, key=lambda name: (name not in required, name))
        schema["properties"] = {name: props[name] for name in order}
    return schema


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``additionalProperties: false`` on an object schema that leaves it open."""
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def _without_patterns(schema: dict[str, Any]) -> dict[str, Any]:
    """Drops a ``pattern`` the engine cannot compile; raises ValueError for one that is not a
    regular expression at all (Python's ``re`` stands in for ECMA-262 here)."""
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"pattern {pattern!r} is not a valid regular expression ({exc})"
            ) from None
        del schema["pattern"]
    return schema


def tool_parameters(function: Mapping[str, Any]) -> dict[str, Any]:
    """The schema a call's arguments must satisfy (before the whitespace/lenient options)."""
    strict = function.get("strict")
    params = function.get("parameters")
    if strict is False:
        return dict(ANY_OBJECT)
    if not isinstance(params, Mapping):  # no parameters: the arguments are {}
        return {"type": "object", "properties": {}, "additionalProperties": False}
    schema = _map_schemas(params, _model_order)
    if "type" not in schema:
        schema = {**schema, "type": "object"}
    return _map_schemas(schema, _closed) if strict is True else schema


class GrammarBuilder:
    """Writes the Lark text for one request, checking each schema against the engine."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._lenient: list[tuple[str, list[str]]] = []

    def _json(self, schema: Mapping[str, Any], field: str, check: bool) -> str:
        """``%json {...}`` with our whitespace cap. ``check``: compile the schema alone first;
        lenient when the strict compile fails, and without ``pattern`` keywords when even that
        fails on a regex the engine lacks (such as lookaround). A schema that still fails is the
        caller's error."""
        options: dict[str, Any] = {"whitespace_pattern": WHITESPACE_PATTERN}
        problems = self.backend.json_schema_problems(dict(schema), lenient=False) if check else []
        if problems:
            still = self.backend.json_schema_problems(dict(schema), lenient=True)
            if still:
                try:
                    unpatterned = _map_schemas(schema, _without_patterns)
                except ValueError as exc:
                    raise GrammarError(field, str(exc)) from None
                if unpatterned == schema or self.backend.json_schema_problems(
                    unpatterned, lenient=True
                ):
                    raise GrammarError(field, "; ".join(still))
                schema, problems = unpatterned, [*problems, "pattern dropped"]
            options["lenient"] = True
            self._lenient.append((field, problems))
        guidance = {**schema.get("x-guidance", {}), **options}
        return "%json " + json.dumps({**schema, "x-guidance": guidance})

    def build(
        self,
        *,
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str,
        function_name: str | None = None,
        parallel_tool_calls: bool = True,
        response_schema: Mapping[str, Any] | None = None,
        first_call_index: int | None = None,
        tools_field: str = "tools",
        response_field: str = "response_format",
    ) -> ToolGrammar | None:
        """``tools``: OpenAI-style declarations; ``tool_choice``: "auto", "required" or "none"
        (``function_name`` set = exactly one call of that tool, whose id counter is
        ``first_call_index`` when given, the conversation's next one); ``response_schema``: JSON
        content required instead of free text. None when nothing needs a grammar. Other calls'
        counters are the model's own (the parser renumbers duplicates)."""
        if tool_choice not in ("auto", "required", "none"):
            raise ValueError(f"tool_choice {tool_choice!r}")
        calls = list(range(len(tools))) if tool_choice != "none" else []
        if function_name is not None:
            calls = [i for i in calls if _function(tools[i]).get("name") == function_name]
            if not calls:
                raise GrammarError("tool_choice", f"{function_name!r} is not a declared tool")
        if not calls and response_schema is None:
            return None
        # The common case compiles once; only a grammar that fails is rewritten schema by schema
        # with the fallbacks (the per-schema checks would double a cold compile otherwise).
        args = (tools, calls, tool_choice, function_name, parallel_tool_calls, response_schema)
        fields = (first_call_index, tools_field, response_field)
        self._lenient = []
        text = self._write(*args, *fields, check=False)
        try:
            return ToolGrammar(text, [], self.backend.compile(text))
        except GrammarError:
            text = self._write(*args, *fields, check=True)
            return ToolGrammar(text, self._lenient, self.backend.compile(text))

    def _write(
        self,
        tools: Sequence[Mapping[str, Any]],
        calls: list[int],
        tool_choice: str,
        function_name: str | None,
        parallel_tool_calls: bool,
        response_schema: Mapping[str, Any] | None,
        first_call_index: int | None,
        tools_field: str,
        response_field: str,
        *,
        check: bool,
    ) -> str:
        lines = ["start: body"]
        if calls:
            rules = []
            for i in calls:
                function = _function(tools[i])
                header = f"functions.{function['name']}:"
                if function_name is not None and first_call_index is not None:
                    index = json.dumps(str(first_call_index))
                else:
                    index = "IDX"
                lines.append(f"tool_{i}: {json.dumps(header)} {index} {ARGUMENT_BEGIN} args_{i}")
                field = f"{tools_field}[{i}].parameters"
                lines.append(f"args_{i}: {self._json(tool_parameters(function), field, check)}")
                rules.append(f"tool_{i}")
            lines.append(f"call: {CALL_BEGIN} ({' | '.join(rules)}) {CALL_END}")
            repeat = "+" if parallel_tool_calls and function_name is None else ""
            lines.append(f"section: {SECTION_BEGIN} call{repeat} {SECTION_END}")
            lines.append(f"IDX: /[0-9]{{1,{MAX_CALL_INDEX_DIGITS}}}/")
        if response_schema is not None:
            lines.append(f"json: {self._json(response_schema, response_field, check)}")
        if response_schema is not None:
            body = "json | section" if calls and tool_choice == "auto" else "json"
            body = "section" if calls and tool_choice == "required" else body
        elif tool_choice == "auto" and function_name is None:
            body = "TEXT | TEXT section"
            lines.append(r"TEXT: /(.|\n)*/")
        else:
            body = "section"
        lines.insert(1, f"body: {body}")
        return "\n".join(lines) + "\n"


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function", tool)
    return fn if isinstance(fn, Mapping) else {}
