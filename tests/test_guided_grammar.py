"""Guided decoding without a model: the Kimi tool-call grammar, the per-completion guide and masks.

Everything runs on the demo tokenizer (2,048 ids, Kimi's 256 specials) through the real llguidance
backend. Golden outputs are walked token by token the way the engine samples them: each token must
be allowed by the mask the engine would apply (``MaskFiller`` -> ``apply_masks``) and is then fed
with ``Guide.sync``; at the end the grammar accepts and the stop ids are allowed. Covered:

* every tool_choice (auto, required, named with its forced counter, parallel_tool_calls off), JSON
  response formats alone and composed with tools, well-formed outputs of the parser corpus, and
  every golden call of the 240-case tool corpus through the grammar built for that case's tools;
* rejections: unknown names, JSON type / required / enum / minItems / maxItems violations, bare
  markers, any special token inside a JSON string, text before a required section, while a marker
  *spelled* with ordinary tokens stays string content;
* masks: never empty along a golden walk, stop ids allowed exactly when the grammar accepts, ids
  past the tokenizer's vocabulary never allowed;
* the guide: reasoning handover on ``</think>`` and on the section opener, reasoning bans, the
  thinking section left unconstrained, ``sync`` idempotence and replay, refused tokens, tool_choice
  none;
* lenient schema fallback (reported and counted) and uncompilable schemas (``GrammarError`` naming
  the field); the JSON whitespace cap; schema normalisation (strict, no parameters, property
  order); ``apply_masks`` / ``unpack_bitmask`` against a plain reference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

from kimi_grpc.guided.backend import GrammarError, mask_words
from kimi_grpc.guided.constraint import THINK_BEGIN, THINK_END, build_constraint
from kimi_grpc.guided.guide import Constraint, Guide, GuideError
from kimi_grpc.guided.llguidance_backend import LLGuidanceBackend
from kimi_grpc.guided.masks import GuidedStats, MaskFiller, StepMasks, apply_masks, unpack_bitmask
from kimi_grpc.guided.tool_grammar import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    MARKERS,
    MAX_JSON_WHITESPACE,
    SECTION_BEGIN,
    SECTION_END,
    GrammarBuilder,
    tool_parameters,
)
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.guided_corpus import CorpusCase, corpus
from tests.test_parsers import CORPUS as PARSER_CORPUS

TOK = KimiTokenizer.from_dir(demo_tokenizer_dir())
V = TOK.vocab_size
IM_END = "<|im_end|>"
SB, SE, CB, AB, CE = (TOK.token_id(m) for m in MARKERS)
TB, TE = TOK.token_id(THINK_BEGIN), TOK.token_id(THINK_END)
EOS_IDS = (TOK.im_end_id, TOK.eos_id)
STOPS = frozenset(EOS_IDS)
SPECIAL_IDS = sorted(TOK.special_tokens.values())
BARE_MARKERS = {CB, AB, CE, SE}  # banned in every reasoning section

# ---- tools -------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "city": {"type": "string"},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "web.search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                "tags": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "safe": {"type": "boolean"},
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, TIME, SEARCH]
JSON_OBJECT = {"type": "object"}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
REASONING = ["The user wants the weather; I should call a tool.\n", THINK_END]


def ids(*parts: str) -> list[int]:
    """Token ids: a part naming a special token is that token, anything else is ordinary text (a
    marker spelled inside it stays ordinary tokens)."""
    out: list[int] = []
    for part in parts:
        special = TOK.special_tokens.get(part)
        out.extend([special] if special is not None else TOK.encode(part))
    return out


def call(name: str, args: Any, index: int = 0) -> list[str]:
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return [CALL_BEGIN, f"functions.{name}:{index}", ARGUMENT_BEGIN, text, CALL_END]


def section(*calls: list[str]) -> list[str]:
    return [SECTION_BEGIN, *(part for c in calls for part in c), SECTION_END]


BEIJING = call("get_weather", {"city": "Beijing"})
THREE_CALLS = section(
    call("get_weather", {"city": "Paris", "unit": "celsius"}, 0),
    call("get_time", {"tz": "Europe/Paris"}, 1),
    call("web.search", {"query": "Paris events", "limit": 5, "safe": True, "tags": ["music"]}, 2),
)

# ---- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> LLGuidanceBackend:
    return LLGuidanceBackend(TOK, eos_token_ids=list(EOS_IDS), vocab_size=V, num_threads=1)


@pytest.fixture(scope="module")
def filler(backend: LLGuidanceBackend) -> Iterator[MaskFiller]:
    mask_filler = MaskFiller(backend, GuidedStats())
    yield mask_filler
    mask_filler.shutdown()


def constrain(backend, *, stats: GuidedStats | None = None, **kwargs: Any) -> Constraint:
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("tool_choice", "auto")
    constraint = build_constraint(backend, TOK, stats or GuidedStats(), **kwargs)
    assert constraint is not None
    return constraint


def allowed(filler: MaskFiller, guide: Guide, stops: frozenset[int] = STOPS) -> np.ndarray:
    """bool [vocab]: the ids the engine could sample for this row (mask applied to logits)."""
    masks = filler.start([(0, guide, stops)]).result()
    logits = torch.zeros(1, filler.backend.vocab_size)
    return apply_masks(logits, masks)[0].isfinite().numpy()


def raw_allowed(backend: LLGuidanceBackend, matcher: Any) -> np.ndarray:
    """bool [vocab]: the backend's own mask for ``matcher`` (no stop-id handling)."""
    bitmask = np.zeros((1, backend.words), dtype=np.int32)
    backend.fill_masks([(matcher, 0)], bitmask)
    return unpack_bitmask(torch.from_numpy(bitmask), backend.vocab_size)[0].numpy()


def check_step(filler: MaskFiller, guide: Guide, stops: frozenset[int]) -> np.ndarray:
    """The row's mask, checked: never empty, stop ids allowed exactly when the answer may end."""
    row = allowed(filler, guide, stops)
    assert row.any(), "a mask that allows nothing"
    assert not row[V:].any(), "an id past the tokenizer's vocabulary is allowed"
    if guide.matcher is not None:
        may_end = guide.matcher.is_accepting()
    else:
        may_end = not guide.reasoning or guide.constraint.stops_in_reasoning
    assert [bool(row[s]) for s in sorted(stops)] == [may_end] * len(stops)
    return row


def walk(
    filler: MaskFiller, constraint: Constraint, tokens: list[int], stops: frozenset[int] = STOPS
) -> Guide:
    """Samples ``tokens`` as the engine would; ends accepting with the stop ids allowed."""
    guide = Guide(constraint)
    for i, token in enumerate(tokens):
        row = check_step(filler, guide, stops)
        assert row[token], f"token {i} {TOK.decode([token])!r} masked after {tokens[:i]}"
        guide.sync(tokens[: i + 1], stops)
    row = check_step(filler, guide, stops)
    assert guide.matcher is not None and guide.matcher.is_accepting()
    assert all(row[s] for s in stops)
    return guide


def refusal(filler: MaskFiller, constraint: Constraint, ok: list[str], bad: list[str]) -> int:
    """Walks ``ok + bad``; returns the index of the first masked token, which must lie in ``bad``
    and make ``Guide.sync`` raise (unless it is a stop id: those are never fed)."""
    good, tokens = ids(*ok), ids(*ok, *bad)
    guide = Guide(constraint)
    for i, token in enumerate(tokens):
        if not check_step(filler, guide, STOPS)[token]:
            assert i >= len(good), f"a valid prefix token {TOK.decode([token])!r} was masked"
            if token in STOPS:  # a stop id ends the completion: it is never fed to the grammar
                return i
            with pytest.raises(GuideError):
                guide.sync(tokens[: i + 1], STOPS)
            return i
        guide.sync(tokens[: i + 1], STOPS)
    raise AssertionError(f"every token of {bad} was allowed")


def compiled(backend, **kwargs: Any):
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("tool_choice", "auto")
    built = GrammarBuilder(backend).build(**kwargs)
    assert built is not None
    return backend.compile(built.text)


# ---- 1. golden outputs for every tool_choice ---------------------------------------------------

GOLDEN = [
    ("auto-plain-text", {}, ["The weather in Beijing is sunny.\n\n- High: 31°C\n- Low: 22°C"]),
    ("auto-empty-output", {}, []),
    ("auto-text-then-one-call", {}, ["Let me check.", *section(BEIJING)]),
    ("auto-text-then-three-calls", {}, ["Checking three things.\n", *THREE_CALLS]),
    ("auto-section-only-unicode", {}, section(call("get_weather", {"city": "北京 🌧"}))),
    (
        "auto-spec-example",
        {},
        [
            "Let me look.",
            SECTION_BEGIN,
            *call("get_weather", '{"city": "Beijing"}', 0),
            *call("get_time", "{}", 1),
            SECTION_END,
        ],
    ),
    ("auto-large-call-counter", {}, section(call("get_time", {}, 9999))),
    ("required-one-call", {"tool_choice": "required"}, section(BEIJING)),
    ("required-three-calls", {"tool_choice": "required"}, THREE_CALLS),
    (
        "named-forced-counter",
        {"tool_choice": "required", "function_name": "get_weather", "first_call_index": 3},
        section(call("get_weather", {"city": "Oslo", "unit": "celsius"}, 3)),
    ),
    (
        "named-model-counter",
        {"tool_choice": "required", "function_name": "web.search"},
        section(call("web.search", {"query": "kimi"}, 7)),
    ),
    ("no-parallel-auto", {"parallel_tool_calls": False}, ["Sure.", *section(BEIJING)]),
    (
        "no-parallel-required",
        {"tool_choice": "required", "parallel_tool_calls": False},
        section(call("get_time", {"tz": "UTC"})),
    ),
    (
        "json-object-alone",
        {"tools": [], "response_schema": JSON_OBJECT},
        ['{"answer": "42", "sources": [1, 2.5, null, true], "nested": {"a": {}}}'],
    ),
    (
        "json-schema-alone",
        {"tools": [], "response_schema": ANSWER},
        ['{"answer": "yes", "confidence": 0.9}'],
    ),
    (
        "json-schema-tool-choice-none",
        {"tool_choice": "none", "response_schema": ANSWER},
        ['{"answer": "no", "confidence": 1}'],
    ),
    (
        "json-or-section-json",
        {"response_schema": ANSWER},
        ['{"answer": "sunny", "confidence": 0.75}'],
    ),
    ("json-or-section-section", {"response_schema": ANSWER}, THREE_CALLS),
    (
        "json-object-or-section-json",
        {"response_schema": JSON_OBJECT},
        ['{"city": "Beijing"}'],
    ),
    (
        "json-with-required-tools",
        {"tool_choice": "required", "response_schema": ANSWER},
        section(BEIJING),
    ),
]


@pytest.mark.parametrize("thinking", [False, True], ids=["instant", "after-reasoning"])
@pytest.mark.parametrize(("kwargs", "parts"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_output_accepted_token_by_token(backend, filler, kwargs, parts, thinking) -> None:
    constraint = constrain(backend, thinking=thinking, **kwargs)
    prefix = REASONING if thinking else []
    guide = walk(filler, constraint, ids(*prefix, *parts))
    assert not guide.reasoning and not guide.in_structure


def test_auto_grammar_accepts_empty_and_text_ends_anywhere(backend, filler) -> None:
    """auto accepts at every point of free text: EOS is allowed after each token."""
    guide = Guide(constrain(backend))
    tokens = ids("Plain answer,\nno tools needed.")
    for i in range(len(tokens) + 1):
        guide.sync(tokens[:i], STOPS)
        assert guide.matcher.is_accepting() and not guide.in_structure
        assert allowed(filler, guide)[TOK.im_end_id]


def test_section_end_leaves_only_the_stop_ids(backend, filler) -> None:
    """After the section closes the grammar is complete: the stop ids are all that is left."""
    stops = frozenset((*EOS_IDS, TOK.encode("9")[0]))
    guide = walk(filler, constrain(backend), ids("Checking.", *section(BEIJING)), stops)
    assert guide.stopped
    assert set(np.flatnonzero(allowed(filler, guide, stops))) == set(stops)


# Parser-corpus outputs (tests/test_parsers.py) that are canonical Kimi output: the grammar
# generates them. The second list is what the parser tolerates but the grammar never generates.
PARSER_CANONICAL = (
    "spec_example",
    "reasoning_ended_by_section",
    "thinking_off_content",
    "dotted_name",
    "marker_look_alikes_kept",
    "empty_output_thinking_off",
)
PARSER_TOLERATED_ONLY = (
    "content_around_section_and_whitespace",
    "several_sections",
    "name_without_prefix",
    "bare_counter_inferred",
    "client_id_only_tool",
    "empty_arguments_and_no_argument_marker",
    "thinking_off_late_think",
)
PARSER_CASES = {case.name: case for case in PARSER_CORPUS}


@pytest.mark.parametrize("name", PARSER_CANONICAL)
def test_parser_corpus_canonical_outputs_accepted(backend, filler, name) -> None:
    case = PARSER_CASES[name]
    constraint = constrain(backend, tools=list(case.tools), thinking=case.thinking)
    walk(filler, constraint, TOK.encode(case.text, allow_special=True))


@pytest.mark.parametrize("name", PARSER_TOLERATED_ONLY)
def test_parser_corpus_noncanonical_outputs_refused(backend, filler, name) -> None:
    case = PARSER_CASES[name]
    guide = Guide(constrain(backend, tools=list(case.tools), thinking=case.thinking))
    tokens = TOK.encode(case.text, allow_special=True)
    for i, token in enumerate(tokens):
        was_allowed = allowed(filler, guide)[token]
        try:
            guide.sync(tokens[: i + 1], STOPS)
        except GuideError:
            assert not was_allowed, "the grammar refused a token its mask allowed"
            return
    pytest.fail("the grammar accepted every token")


def _resolve(schema: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    return defs[ref.removeprefix("#/$defs/")] if ref else schema


def grammar_order(value: Any, schema: Any, defs: dict[str, Any]) -> Any:
    """``value`` with every object's keys in the order the grammar writes them, computed from the
    declared schema: declared properties required first, then by name; undeclared ones after."""
    schema = _resolve(schema, defs)
    for branch in schema.get("anyOf", ()):
        if Draft202012Validator({**branch, "$defs": defs}).is_valid(value):
            return grammar_order(value, branch, defs)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        declared = sorted((k for k in value if k in props), key=lambda k: (k not in required, k))
        extra = schema.get("additionalProperties")
        order = declared + [k for k in value if k not in props]
        return {k: grammar_order(value[k], props.get(k, extra), defs) for k in order}
    if isinstance(value, list):
        return [grammar_order(v, schema.get("items"), defs) for v in value]
    return value


CORPUS = corpus()


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_example_calls_accepted(backend, case: CorpusCase) -> None:
    """All golden calls of a corpus case, in one section, through that case's auto grammar;
    checked against the backend's raw mask (the fast path; MaskFiller is covered above)."""
    built = GrammarBuilder(backend).build(tools=case.tools, tool_choice="auto")
    assert built is not None and built.lenient == []
    grammar = backend.compile(built.text)
    declared = {t["function"]["name"]: t["function"] for t in case.tools}
    calls = []
    for index, (name, args) in enumerate(case.example_calls):
        params = declared[name].get("parameters") or {}
        calls.append(call(name, grammar_order(args, params, params.get("$defs", {})), index))
    tokens = ids("Calling the tools now.\n", *section(*calls))

    matcher = grammar.matcher()
    bitmask = np.zeros((1, backend.words), dtype=np.int32)
    words = bitmask.view(np.uint32)[0]
    eos_words = [(t >> 5, t & 31) for t in EOS_IDS]
    for i, token in enumerate([*tokens, None]):
        backend.fill_masks([(matcher, 0)], bitmask)
        assert words.any()
        accepting = matcher.is_accepting()
        assert [bool(words[w] >> b & 1) for w, b in eos_words] == [accepting] * len(EOS_IDS)
        if token is None:
            break
        assert words[token >> 5] >> (token & 31) & 1, (i, TOK.decode(tokens[: i + 1]))
        assert matcher.consume(token)
    assert matcher.is_accepting() and matcher.is_stopped()


# ---- 2. rejections -----------------------------------------------------------------------------

CALL_HEAD = [SECTION_BEGIN, CALL_BEGIN, "functions.get_weather:0", ARGUMENT_BEGIN]
SEARCH_HEAD = [SECTION_BEGIN, CALL_BEGIN, "functions.web.search:0", ARGUMENT_BEGIN]
REJECTIONS = [
    ("unknown-tool-name", {}, ["Hi.", SECTION_BEGIN, CALL_BEGIN], ["functions.get_wether:0"]),
    ("undeclared-tool", {}, [SECTION_BEGIN, CALL_BEGIN], ["functions.rm_rf:0"]),
    ("name-without-prefix", {}, [SECTION_BEGIN, CALL_BEGIN], ["get_weather:0"]),
    ("counter-over-four-digits", {}, [SECTION_BEGIN, CALL_BEGIN], ["functions.get_time:12345"]),
    ("number-for-string", {}, CALL_HEAD, ['{"city": 42}']),
    ("string-for-integer", {}, SEARCH_HEAD, ['{"query": "x", "limit": "10"}']),
    ("float-for-integer", {}, SEARCH_HEAD, ['{"query": "x", "limit": 2.5}']),
    ("integer-above-maximum", {}, SEARCH_HEAD, ['{"query": "x", "limit": 11}']),
    ("string-for-boolean", {}, SEARCH_HEAD, ['{"query": "x", "safe": "yes"}']),
    ("array-for-object", {}, CALL_HEAD, ['["Beijing"]']),
    ("missing-required-empty", {}, CALL_HEAD, ["{}"]),
    ("missing-required-other-key", {}, CALL_HEAD, ['{"unit": "celsius"}']),
    ("value-out-of-enum", {}, CALL_HEAD, ['{"city": "Paris", "unit": "kelvin"}']),
    ("array-below-min-items", {}, SEARCH_HEAD, ['{"query": "x", "tags": []}']),
    ("array-above-max-items", {}, SEARCH_HEAD, ['{"query": "x", "tags": ["a", "b", "c", "d"]}']),
    ("string-below-min-length", {}, SEARCH_HEAD, ['{"query": ""}']),
    ("unterminated-arguments", {}, CALL_HEAD, ['{"city": "x"', CALL_END]),
    ("bare-call-begin-after-text", {}, ["Let me check."], [CALL_BEGIN]),
    ("bare-call-begin-first", {}, [], [CALL_BEGIN]),
    ("bare-argument-begin", {}, ["x"], [ARGUMENT_BEGIN]),
    ("bare-section-end", {}, ["x"], [SECTION_END]),
    ("empty-section", {}, [SECTION_BEGIN], [SECTION_END]),
    ("text-after-section", {}, ["Hi.", *section(BEIJING)], ["Done."]),
    ("second-section", {}, section(BEIJING), [SECTION_BEGIN]),
    ("think-tag-in-answer", {}, ["Answer"], [THINK_END]),
    ("other-special-in-text", {}, ["Answer"], ["<|im_user|>"]),
    ("text-before-required-section", {"tool_choice": "required"}, [], ["Sure. ", SECTION_BEGIN]),
    ("required-empty", {"tool_choice": "required"}, [], [IM_END]),
    (
        "named-other-tool",
        {"tool_choice": "required", "function_name": "get_weather", "first_call_index": 3},
        [SECTION_BEGIN, CALL_BEGIN],
        ["functions.get_time:3"],
    ),
    (
        "named-wrong-counter",
        {"tool_choice": "required", "function_name": "get_weather", "first_call_index": 3},
        [SECTION_BEGIN, CALL_BEGIN, "functions.get_weather:"],
        ["0"],
    ),
    (
        "named-second-call",
        {"tool_choice": "required", "function_name": "get_weather"},
        [SECTION_BEGIN, *BEIJING],
        [CALL_BEGIN],
    ),
    (
        "no-parallel-second-call",
        {"parallel_tool_calls": False},
        ["x", SECTION_BEGIN, *BEIJING],
        [CALL_BEGIN],
    ),
    ("json-only-text", {"tools": [], "response_schema": JSON_OBJECT}, [], ["The answer"]),
    ("json-only-section", {"tools": [], "response_schema": JSON_OBJECT}, [], [SECTION_BEGIN]),
    ("json-only-array", {"tools": [], "response_schema": JSON_OBJECT}, [], ["[1]"]),
    (
        "json-schema-extra-key",
        {"tools": [], "response_schema": ANSWER},
        [],
        ['{"answer": "a", "x": 1}'],
    ),
    ("json-or-section-text", {"response_schema": ANSWER}, [], ["Sure"]),
    ("json-then-section", {"response_schema": JSON_OBJECT}, ["{}"], [SECTION_BEGIN]),
    ("json-with-required-json", {"tool_choice": "required", "response_schema": ANSWER}, [], ["{"]),
]


@pytest.mark.parametrize(
    ("kwargs", "ok", "bad"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_invalid_output_refused(backend, filler, kwargs, ok, bad) -> None:
    refusal(filler, constrain(backend, **kwargs), ok, bad)


# Prefixes are cut where the grammar does not force the next bytes: where it does (a declared key
# is the only continuation) llguidance's mask allows only the canonical tokenization of the forced
# bytes, although consume() accepts any tokenization of them.
STRING_PREFIXES = [
    ("argument-value", {}, [*CALL_HEAD, '{"city": "Bei']),
    ("argument-key", {}, [*CALL_HEAD, '{"']),
    ("free-key", {"tools": [], "response_schema": JSON_OBJECT}, ['{"ke']),
    ("array-item", {}, [*SEARCH_HEAD, '{"query": "x", "tags": ["mu']),
    ("open-object-value", {"response_schema": JSON_OBJECT}, ['{"k": "v']),
    ("response-value", {"tools": [], "response_schema": ANSWER}, ['{"answer": "']),
]


@pytest.mark.parametrize(
    ("kwargs", "prefix"), [s[1:] for s in STRING_PREFIXES], ids=[s[0] for s in STRING_PREFIXES]
)
def test_no_special_token_inside_a_json_string(backend, filler, kwargs, prefix) -> None:
    guide = walk_prefix(filler, constrain(backend, **kwargs), ids(*prefix))
    row = allowed(filler, guide)
    for marker in (SB, SE, CB, AB, CE, TOK.im_end_id):
        assert not row[marker], TOK.decode([marker])
    assert not row[SPECIAL_IDS].any()
    assert guide.in_structure


def walk_prefix(filler: MaskFiller, constraint: Constraint, tokens: list[int]) -> Guide:
    guide = Guide(constraint)
    for i, token in enumerate(tokens):
        assert check_step(filler, guide, STOPS)[token]
        guide.sync(tokens[: i + 1], STOPS)
    return guide


@pytest.mark.parametrize("spelled", [*MARKERS, THINK_END, IM_END, "[EOS]"])
def test_marker_spelled_with_ordinary_tokens_stays_in_the_string(backend, filler, spelled) -> None:
    """The bytes of a marker produced as ordinary tokens are string content: the call does not
    end there, specials stay masked until the string closes, and the whole call is accepted."""
    spelled_ids = TOK.encode(spelled)
    assert all(not TOK.is_special(t) for t in spelled_ids) and len(spelled_ids) > 1
    constraint = constrain(backend)
    opening = ids(*CALL_HEAD, '{"city": "a ')
    guide = walk_prefix(filler, constraint, opening + spelled_ids)
    row = allowed(filler, guide)
    assert guide.in_structure and not row[SPECIAL_IDS].any() and row[TOK.encode('"')[0]]
    closing = ids(' b"}')
    walk(filler, constraint, opening + spelled_ids + closing + ids(CALL_END, SECTION_END))
    arguments = TOK.decode(ids('{"city": "a ') + spelled_ids + closing)
    assert json.loads(arguments) == {"city": f"a {spelled} b"}


# ---- 3. masks ----------------------------------------------------------------------------------


def test_request_stop_id_follows_acceptance(backend, filler) -> None:
    """A request stop id that is an ordinary token the grammar allows inside JSON is cleared while
    the grammar does not accept and set while it does; every other bit is the backend's own."""
    nine = TOK.encode("9")[0]
    stops = frozenset((*EOS_IDS, nine))
    tokens = ids("Checking.", *section(call("get_weather", {"city": "Oslo"})))
    assert nine not in tokens
    guide = Guide(constrain(backend))
    cleared = set_when_accepting = 0
    others = np.ones(V, dtype=bool)
    others[list(stops)] = False
    for i in range(len(tokens) + 1):
        guide.sync(tokens[:i], stops)
        row, raw = allowed(filler, guide, stops), raw_allowed(backend, guide.matcher)
        accepting = guide.matcher.is_accepting()
        assert (row[others] == raw[others]).all()
        assert row[nine] == accepting
        cleared += bool(raw[nine] and not accepting)
        set_when_accepting += bool(accepting)
    assert cleared > 0 and set_when_accepting > 0


def test_backend_mask_allows_eos_exactly_when_accepting(backend) -> None:
    grammar = compiled(backend, tool_choice="required")
    matcher = grammar.matcher()
    for token in ids(*section(BEIJING)):
        row = raw_allowed(backend, matcher)
        assert not row[list(EOS_IDS)].any() and not matcher.is_accepting()
        assert matcher.consume(token)
    assert matcher.is_accepting() and raw_allowed(backend, matcher)[list(EOS_IDS)].all()


def test_empty_mask_row_reported(backend, filler) -> None:
    """A row whose grammar allows nothing (an errored matcher) is listed in StepMasks.empty."""
    guide = Guide(constrain(backend, tool_choice="required"))
    assert not guide.matcher.consume(TOK.encode("x")[0]) and guide.matcher.error()
    masks = filler.start([(4, Guide(constrain(backend)), STOPS), (7, guide, STOPS)]).result()
    assert masks.grammar_rows == [4, 7] and masks.empty == [7]
    assert masks.bitmask[0].any() and not masks.bitmask[1].any()


def test_mask_filler_counts_masks(backend) -> None:
    stats = GuidedStats()
    mask_filler = MaskFiller(backend, stats)
    try:
        rows = [(i, Guide(constrain(backend)), STOPS) for i in range(3)]
        rows.append((3, Guide(constrain(backend, thinking=True)), STOPS))  # reasoning: no mask
        assert mask_filler.start([]) is None
        masks = mask_filler.start(rows).result()
        assert masks.grammar_rows == [0, 1, 2] and [r for r, _ in masks.banned] == [3]
        assert stats.masks == 3 and stats.mask_seconds > 0
    finally:
        mask_filler.shutdown()


@pytest.mark.parametrize("extra", [64, 50])
def test_ids_beyond_the_tokenizer_never_allowed(extra) -> None:
    """The model's logits are wider than the tokenizer: padding ids never get a bit."""
    wide = LLGuidanceBackend(TOK, eos_token_ids=list(EOS_IDS), vocab_size=V + extra, num_threads=1)
    assert wide.words == mask_words(V + extra)
    wide_filler = MaskFiller(wide, GuidedStats())
    try:
        for kwargs, parts in [
            ({}, ["Hello ", *THREE_CALLS]),
            ({"tools": [], "response_schema": JSON_OBJECT}, ['{"a": [1]}']),
        ]:
            constraint = constrain(wide, **kwargs)
            tokens = ids(*parts)
            guide = Guide(constraint)
            for i in range(len(tokens) + 1):
                guide.sync(tokens[:i], STOPS)
                masks = wide_filler.start([(0, guide, STOPS)]).result()
                bits = unpack_bitmask(masks.bitmask, 32 * wide.words)[0]
                assert bits[:V].any() and not bits[V:].any()
                row = allowed(wide_filler, guide)
                assert row.shape == (V + extra,) and not row[V:].any()
                assert i == len(tokens) or row[tokens[i]]
    finally:
        wide_filler.shutdown()


# ---- 4. the guide ------------------------------------------------------------------------------


class RecordingGrammar:
    """A compiled grammar whose matchers log every token they are fed."""

    def __init__(self, grammar: Any) -> None:
        self.grammar = grammar
        self.fed: list[int] = []

    def matcher(self) -> RecordingMatcher:
        return RecordingMatcher(self.grammar.matcher(), self.fed)


class RecordingMatcher:
    def __init__(self, inner: Any, log: list[int]) -> None:
        self._inner, self._log = inner, log

    def consume(self, token_id: int) -> bool:
        self._log.append(token_id)
        return self._inner.consume(token_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def recording(backend, **kwargs: Any) -> tuple[Constraint, RecordingGrammar]:
    constraint = constrain(backend, **kwargs)
    grammar = RecordingGrammar(constraint.grammar)
    return Constraint(**{**constraint.__dict__, "grammar": grammar}), grammar


def test_handover_on_think_end(backend, filler) -> None:
    constraint, grammar = recording(backend, thinking=True)
    guide = Guide(constraint)
    thoughts = ids("Plan: check the weather.")
    guide.sync(thoughts, STOPS)
    assert guide.reasoning and guide.matcher is None and not guide.in_structure
    guide.sync([*thoughts, TE], STOPS)
    assert not guide.reasoning and grammar.fed == []  # the matcher starts after </think>
    fresh = Guide(constrain(backend))
    assert (allowed(filler, guide) == allowed(filler, fresh)).all()


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_handover_on_section_begin_during_thinking(backend, filler, tool_choice) -> None:
    constraint, grammar = recording(backend, thinking=True, tool_choice=tool_choice)
    assert constraint.section_begin_id == SB
    guide = Guide(constraint)
    tokens = ids("I need the weather.", SECTION_BEGIN)
    guide.sync(tokens, STOPS)
    assert not guide.reasoning and grammar.fed == [SB]  # the section opener is its first token
    assert set(np.flatnonzero(allowed(filler, guide))) == {CB}
    walk(filler, constraint, ids("I need the weather.", *section(BEIJING)))


def test_section_begin_does_not_end_thinking_when_the_grammar_cannot_start_with_it(backend) -> None:
    constraint = constrain(backend, thinking=True, tools=[], response_schema=ANSWER)
    assert constraint.section_begin_id is None and SB in constraint.reasoning_banned
    guide = Guide(constraint)
    guide.sync(ids("hmm", SECTION_BEGIN), STOPS)
    assert guide.reasoning and guide.matcher is None


ALL_STOPS = frozenset((*EOS_IDS, TOK.encode("9")[0]))
REASONING_BANS = [
    ("auto", {}, BARE_MARKERS | {TB}),
    ("required", {"tool_choice": "required"}, BARE_MARKERS | {TB} | ALL_STOPS),
    (
        "named",
        {"tool_choice": "required", "function_name": "get_time"},
        BARE_MARKERS | {TB} | ALL_STOPS,
    ),
    ("json-or-section", {"response_schema": ANSWER}, BARE_MARKERS | {TB} | ALL_STOPS),
    ("json-only", {"tools": [], "response_schema": ANSWER}, BARE_MARKERS | {TB, SB} | ALL_STOPS),
    (
        "none-with-json",
        {"tool_choice": "none", "response_schema": JSON_OBJECT},
        BARE_MARKERS | {TB, SB} | ALL_STOPS,
    ),
    ("none", {"tool_choice": "none"}, BARE_MARKERS | {TB, SB}),
]


@pytest.mark.parametrize(
    ("kwargs", "banned"), [r[1:] for r in REASONING_BANS], ids=[r[0] for r in REASONING_BANS]
)
def test_reasoning_bans(backend, filler, kwargs, banned) -> None:
    """While thinking only the bare markers and <think> are masked, plus the section opener when
    the grammar cannot start with it and the stop ids when the answer must not be empty."""
    guide = Guide(constrain(backend, thinking=True, **kwargs))
    guide.sync(ids("thinking "), ALL_STOPS)
    masks = filler.start([(0, guide, ALL_STOPS)]).result()
    assert masks.bitmask is None and masks.grammar_rows == []
    assert [row for row, _ in masks.banned] == [0]
    assert set(masks.banned[0][1]) == banned
    assert set(np.flatnonzero(~allowed(filler, guide, ALL_STOPS))) == banned
    assert guide.constraint.stops_in_reasoning == (not banned & ALL_STOPS)


def test_thinking_section_is_never_constrained(backend) -> None:
    """Arbitrary ordinary tokens (lone continuation bytes, JSON fragments, anything) are consumed
    while reasoning without a matcher."""
    constraint, grammar = recording(backend, thinking=True, tool_choice="required")
    rng = np.random.default_rng(0)
    ordinary = [t for t in range(V) if not TOK.is_special(t)]
    tokens = [int(t) for t in rng.choice(ordinary, size=300)] + TOK.encode('\x80}]"')
    guide = Guide(constraint)
    for i in range(len(tokens)):
        guide.sync(tokens[: i + 1], STOPS)
    assert guide.reasoning and guide.matcher is None and grammar.fed == []
    assert guide.num_consumed == len(tokens)


def test_sync_is_idempotent(backend) -> None:
    constraint, grammar = recording(backend)
    guide = Guide(constraint)
    tokens = ids("Checking.", *section(BEIJING))
    half = tokens[:7]
    guide.sync(half, STOPS)
    guide.sync(half, STOPS)
    assert grammar.fed == half and guide.num_consumed == 7
    guide.sync(tokens, STOPS)
    guide.sync(tokens, STOPS)
    assert grammar.fed == tokens and guide.matcher.is_accepting()
    guide.sync([*tokens, TOK.im_end_id], STOPS)  # a stop id ends the completion, never fed
    assert grammar.fed == tokens and guide.num_consumed == len(tokens) + 1


FULL = ids(*REASONING, "Let me check.", *section(BEIJING, call("get_time", {"tz": "UTC"}, 1)))
CUTS = [0, 3, FULL.index(TE), FULL.index(TE) + 1, FULL.index(SB) + 1, len(FULL) - 8, len(FULL) - 1]


@pytest.mark.parametrize("cut", CUTS)
def test_shorter_output_replays(backend, filler, cut) -> None:
    """Discarded tokens (rollback, preemption): the guide equals a fresh one fed the shorter
    output, and the discarded tokens can be sampled again."""
    constraint = constrain(backend, thinking=True)
    guide, fresh = Guide(constraint), Guide(constraint)
    guide.sync(FULL, STOPS)
    assert guide.matcher.is_accepting()
    guide.sync(FULL[:cut], STOPS)
    fresh.sync(FULL[:cut], STOPS)
    assert (guide.reasoning, guide.num_consumed) == (fresh.reasoning, fresh.num_consumed)
    assert (guide.matcher is None) == (fresh.matcher is None)
    assert (allowed(filler, guide) == allowed(filler, fresh)).all()
    assert guide.in_structure == fresh.in_structure
    guide.sync(FULL, STOPS)
    assert guide.matcher.is_accepting() and guide.num_consumed == len(FULL)


@pytest.mark.parametrize(
    ("kwargs", "tokens"),
    [
        ({}, ids("Answer", CALL_BEGIN)),
        ({"thinking": True}, ids("hmm", THINK_END, "ok", ARGUMENT_BEGIN)),
        ({"thinking": True, "tool_choice": "required"}, ids("hmm", THINK_END, "text")),
        ({"tool_choice": "required"}, ids(*CALL_HEAD, '{"city": 1')),
    ],
    ids=["bare-marker", "after-reasoning", "required-text", "bad-argument"],
)
def test_refused_token_raises(backend, kwargs, tokens) -> None:
    guide = Guide(constrain(backend, **kwargs))
    with pytest.raises(GuideError):
        guide.sync(tokens, STOPS)


@pytest.mark.parametrize("guided", [True, False])
def test_tool_choice_none_bans_markers_everywhere(backend, filler, guided) -> None:
    constraint = constrain(backend, tool_choice="none", thinking=True, guided=guided)
    assert constraint.grammar is None and set(constraint.banned) == {SB, SE, CB, AB, CE}
    guide = Guide(constraint)
    assert set(guide.banned_ids()) == {SB, SE, CB, AB, CE, TB}
    assert set(np.flatnonzero(~allowed(filler, guide))) == {SB, SE, CB, AB, CE, TB}
    instant = Guide(constrain(backend, tool_choice="none", guided=guided))
    assert not instant.reasoning and set(instant.banned_ids()) == {SB, SE, CB, AB, CE}
    tokens = ids("no tools", THINK_END, 'Just text: {"a": 1}')
    guide.sync(tokens, STOPS)
    assert not guide.reasoning and guide.matcher is None and not guide.in_structure
    assert set(guide.banned_ids()) == {SB, SE, CB, AB, CE}
    row = allowed(filler, guide)
    assert set(np.flatnonzero(~row)) == {SB, SE, CB, AB, CE}


def test_no_constraint_without_a_grammar_or_bans(backend) -> None:
    stats = GuidedStats()
    assert (
        build_constraint(backend, TOK, stats, tools=TOOLS, tool_choice="auto", guided=False) is None
    )
    assert build_constraint(None, TOK, stats, tools=TOOLS, tool_choice="required") is None
    assert build_constraint(backend, TOK, stats, tools=[], tool_choice="auto") is None
    assert GrammarBuilder(backend).build(tools=TOOLS, tool_choice="none") is None


def test_constraint_without_reasoning_starts_at_the_first_token(backend) -> None:
    """INSTANT mode, Generate, or the engine request after a forced </think>."""
    guide = Guide(constrain(backend, tool_choice="required", thinking=False))
    assert not guide.reasoning and guide.matcher is not None and guide.in_structure
    with pytest.raises(GuideError):
        guide.sync([TE], STOPS)


# ---- 5. lenient fallback and uncompilable schemas ----------------------------------------------


def tool(name: str, parameters: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


LENIENT_TOOLS = [
    WEATHER,
    tool("not_tool", {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}),
    tool(
        "unique_tool",
        {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}},
    ),
    tool(
        "format_tool",
        {"type": "object", "properties": {"when": {"type": "string", "format": "moon-phase"}}},
    ),
]


def test_lenient_fallback_reported_counted_and_logged(backend, filler, caplog) -> None:
    built = GrammarBuilder(backend).build(tools=LENIENT_TOOLS, tool_choice="auto")
    fields = [field for field, _ in built.lenient]
    assert fields == ["tools[1].parameters", "tools[2].parameters", "tools[3].parameters"]
    problems = [" ".join(p) for _, p in built.lenient]
    assert "not" in problems[0] and "uniqueItems" in problems[1] and "moon-phase" in problems[2]

    stats = GuidedStats()
    with caplog.at_level(logging.WARNING, logger="kimi_grpc.guided.constraint"):
        constraint = constrain(backend, stats=stats, tools=LENIENT_TOOLS)
    assert stats.lenient_fallbacks == 3
    assert sum("compiled leniently" in r.getMessage() for r in caplog.records) == 3
    # the unenforceable keywords are not enforced; everything else still is
    walk(
        filler,
        constraint,
        ids(
            *section(
                call("not_tool", {"x": "a string"}, 0),
                call("unique_tool", {"ids": [1, 1]}, 1),
                call("format_tool", {"when": "whenever"}, 2),
                BEIJING,
            )
        ),
    )
    refusal(
        filler,
        constraint,
        [SECTION_BEGIN, CALL_BEGIN, "functions.unique_tool:0", ARGUMENT_BEGIN],
        ['{"ids": 5}'],
    )


def test_lenient_response_format(backend) -> None:
    stats = GuidedStats()
    schema = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    constrain(backend, stats=stats, tools=[], response_schema=schema)
    assert stats.lenient_fallbacks == 1
    built = GrammarBuilder(backend).build(tools=[], tool_choice="auto", response_schema=schema)
    assert [f for f, _ in built.lenient] == ["response_format"]


BAD_PATTERN = {"type": "object", "properties": {"code": {"type": "string", "pattern": "(("}}}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tools": [WEATHER, tool("bad", BAD_PATTERN)]}, "tools[1].parameters"),
        (
            {"tools": [tool("bad", BAD_PATTERN)], "tools_field": "request.tools"},
            "request.tools[0].parameters",
        ),
        ({"tools": [], "response_schema": BAD_PATTERN}, "response_format"),
        ({"tool_choice": "required", "function_name": "nope"}, "tool_choice"),
    ],
    ids=["tool", "tools-field", "response-format", "unknown-named-tool"],
)
def test_uncompilable_request_raises_grammar_error(backend, kwargs, field) -> None:
    stats = GuidedStats()
    with pytest.raises(GrammarError) as raised:
        build_constraint(backend, TOK, stats, **{"tools": TOOLS, "tool_choice": "auto", **kwargs})
    assert raised.value.field == field and str(raised.value).startswith(f"{field}: ")
    assert stats.lenient_fallbacks == 0


# ---- 6. whitespace cap -------------------------------------------------------------------------

SPACE_RUNS = {
    len(TOK.token_bytes(t)): t
    for t in range(V)
    if not TOK.is_special(t) and set(TOK.token_bytes(t)) == {0x20}
}
WS_PLACES = [
    ("after-brace-in-arguments", {}, [*CALL_HEAD, "{"], ['"city": "x"}', CALL_END, SECTION_END]),
    ("after-colon-in-arguments", {}, [*CALL_HEAD, '{"city":'], ['"x"}', CALL_END, SECTION_END]),
    (
        "after-brace-in-response",
        {"tools": [], "response_schema": ANSWER},
        ["{"],
        ['"answer": "a", "confidence": 1}'],
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "before", "after"), [w[1:] for w in WS_PLACES], ids=[w[0] for w in WS_PLACES]
)
def test_json_whitespace_capped(backend, filler, kwargs, before, after) -> None:
    assert MAX_JSON_WHITESPACE == 32 and {1, 2, 32} <= SPACE_RUNS.keys()
    space, two, thirty_two = SPACE_RUNS[1], SPACE_RUNS[2], SPACE_RUNS[32]
    constraint = constrain(backend, **kwargs)
    head = ids(*before)
    guide = walk_prefix(filler, constraint, head + [space] * (MAX_JSON_WHITESPACE - 1))
    row = allowed(filler, guide)
    assert row[space] and not row[two]  # 31 + 2 would be 33
    guide.sync(head + [space] * MAX_JSON_WHITESPACE, STOPS)
    row = allowed(filler, guide)
    assert not row[space] and not row[TOK.encode("\n")[0]] and not row[TOK.encode("\t")[0]]
    walk(filler, constraint, head + [space] * MAX_JSON_WHITESPACE + ids(*after))

    guide = walk_prefix(filler, constraint, [*head, thirty_two])  # one 32-space token
    assert not allowed(filler, guide)[space]
    mixed = [TOK.encode("\n")[0], TOK.encode("\t")[0], TOK.encode("\r")[0]] * 10 + [space] * 2
    walk(filler, constraint, head + mixed + ids(*after))
    with pytest.raises(GuideError):
        Guide(constraint).sync([*head, *mixed, space], STOPS)


# ---- 7. schema normalisation -------------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
NESTED = {
    "type": "object",
    "properties": {
        "loc": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
    },
    "required": ["loc"],
}


def accepts(filler: MaskFiller, constraint: Constraint, tokens: list[int]) -> bool:
    """Whether every token is allowed by its mask in turn and the grammar then accepts."""
    guide = Guide(constraint)
    for i, token in enumerate(tokens):
        if not check_step(filler, guide, STOPS)[token]:
            return False
        guide.sync(tokens[: i + 1], STOPS)
    return guide.matcher.is_accepting()


def args_accepted(filler, backend, function: dict[str, Any], arguments: str) -> bool:
    constraint = constrain(backend, tools=[{"type": "function", "function": function}])
    return accepts(filler, constraint, ids(*section(call(function["name"], arguments))))


@pytest.mark.parametrize(
    ("function", "arguments", "accepted"),
    [
        (
            {"name": "f", "parameters": CITY, "strict": False},
            '{"anything": [1, {"x": null}]}',
            True,
        ),
        ({"name": "f", "parameters": CITY, "strict": False}, "{}", True),
        ({"name": "f", "parameters": CITY, "strict": False}, '["not an object"]', False),
        ({"name": "f", "parameters": CITY}, '{"city": "x", "extra": 1}', True),
        ({"name": "f", "parameters": CITY, "strict": True}, '{"city": "x", "extra": 1}', False),
        ({"name": "f", "parameters": CITY, "strict": True}, '{"city": "x"}', True),
        ({"name": "f", "parameters": NESTED}, '{"loc": {"lat": 1, "alt": 2}}', True),
        (
            {"name": "f", "parameters": NESTED, "strict": True},
            '{"loc": {"lat": 1, "alt": 2}}',
            False,
        ),
        ({"name": "f"}, "{}", True),
        ({"name": "f"}, '{"a": 1}', False),
        ({"name": "f", "parameters": None}, '{"a": 1}', False),
        ({"name": "f", "parameters": {"properties": CITY["properties"]}}, '"Beijing"', False),
        ({"name": "f", "parameters": {"properties": CITY["properties"]}}, '{"city": "x"}', True),
    ],
    ids=[
        "non-strict-any-object",
        "non-strict-empty",
        "non-strict-not-an-object",
        "open-by-default",
        "strict-closes",
        "strict-valid",
        "nested-open-by-default",
        "strict-closes-nested",
        "no-parameters-empty",
        "no-parameters-refuses-keys",
        "null-parameters-refuses-keys",
        "untyped-schema-is-object",
        "untyped-schema-valid",
    ],
)
def test_schema_normalisation(backend, filler, function, arguments, accepted) -> None:
    assert args_accepted(filler, backend, function, arguments) == accepted


@pytest.mark.parametrize(
    "name",
    [
        "settings",
        "default",
        "enum",
    ],
)
def test_strict_closes_objects_whatever_the_property_name(backend, filler, name) -> None:
    """strict: true closes every nested object, also under a property that happens to be named
    like a JSON-Schema data keyword."""
    inner = {"type": "object", "properties": {"x": {"type": "string"}}}
    params = {"type": "object", "properties": {name: inner}}
    function = {"name": "f", "parameters": params, "strict": True}
    assert args_accepted(filler, backend, function, json.dumps({name: {"x": "a"}}))
    assert not args_accepted(filler, backend, function, json.dumps({name: {"x": "a", "y": 1}}))


ORDERED = {
    "type": "object",
    "properties": {
        "zeta": {"type": "integer"},
        "alpha": {"type": "integer"},
        "mid": {
            "type": "object",
            "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
            "required": ["b"],
        },
        "beta": {"type": "integer"},
    },
    "required": ["zeta", "mid"],
    "default": {"properties": {"z": 1, "a": 2}},
}


def test_property_order_required_first_then_by_name(backend, filler) -> None:
    params = tool_parameters({"name": "f", "parameters": ORDERED})
    assert list(params["properties"]) == ["mid", "zeta", "alpha", "beta"]
    assert list(params["properties"]["mid"]["properties"]) == ["b", "a"]
    assert params["default"] == ORDERED["default"]  # data keywords are values, not schemas
    assert list(params["default"]["properties"]) == ["z", "a"]
    strict = tool_parameters({"name": "f", "parameters": ORDERED, "strict": True})
    assert strict["additionalProperties"] is False
    assert strict["properties"]["mid"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["default"]

    function = {"name": "f", "parameters": ORDERED}
    good = '{"mid": {"b": 1, "a": 2}, "zeta": 3, "alpha": 4, "beta": 5}'
    assert args_accepted(filler, backend, function, good)
    declared = {"zeta": 3, "alpha": 4, "mid": {"a": 2, "b": 1}, "beta": 5}
    assert json.dumps(grammar_order(declared, ORDERED, {})) == good  # the corpus sweep's helper
    for bad in (
        '{"zeta": 3, "mid": {"b": 1}}',  # declared order
        '{"mid": {"a": 2, "b": 1}, "zeta": 3}',  # nested declared order
        '{"mid": {"b": 1}, "zeta": 3, "beta": 5, "alpha": 4}',  # optional ones unsorted
    ):
        assert not args_accepted(filler, backend, function, bad), bad


# ---- 8. apply_masks / unpack_bitmask -----------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 33, 100, 2048 + 50])
def test_unpack_and_apply_masks_match_a_reference(vocab) -> None:
    gen = torch.Generator().manual_seed(vocab)
    words = mask_words(vocab)
    bitmask = torch.randint(-(2**31), 2**31, (3, words), dtype=torch.int64, generator=gen)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, -1] = -1  # bit 31 of the last word, beyond the vocabulary when vocab % 32 != 0
    reference = torch.tensor(
        [
            [(int(bitmask[r, t // 32]) & 0xFFFFFFFF) >> (t % 32) & 1 == 1 for t in range(vocab)]
            for r in range(3)
        ]
    )
    unpacked = unpack_bitmask(bitmask, vocab)
    assert unpacked.dtype == torch.bool and unpacked.shape == (3, vocab)
    assert torch.equal(unpacked, reference)

    logits = torch.randn(5, vocab, generator=gen)
    original = logits.clone()
    banned = [(1, (0, vocab - 1)), (2, (vocab // 2,)), (4, (vocab - 1, vocab - 1))]
    masks = StepMasks([0, 2, 3], bitmask, banned, [])
    out = apply_masks(logits.clone(), masks)
    expected = logits.clone()
    for i, row in enumerate([0, 2, 3]):
        for t in range(vocab):
            if not reference[i, t]:
                expected[row, t] = float("-inf")
    for row, banned_ids in banned:
        for t in banned_ids:
            expected[row, t] = float("-inf")
    assert torch.equal(out, expected) and torch.equal(logits, original)
    assert torch.equal(apply_masks(logits.clone(), StepMasks([], None, [], [])), original)


def test_lookaround_pattern_is_dropped_leniently(backend, filler) -> None:
    """A valid regex the engine cannot run (lookaround) compiles without that pattern (counted);
    the rest of the schema stays enforced."""
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^(?!x)[a-z]+$"},
            "n": {"type": "integer"},
        },
        "required": ["code", "n"],
    }
    lookaround = tool("lookaround", schema)
    built = GrammarBuilder(backend).build(tools=[lookaround], tool_choice="auto")
    ((field, problems),) = built.lenient
    assert field == "tools[0].parameters" and "pattern dropped" in problems
    stats = GuidedStats()
    constraint = constrain(backend, stats=stats, tools=[lookaround])
    assert stats.lenient_fallbacks == 1
    walk(filler, constraint, ids(*section(call("lookaround", {"code": "xyz", "n": 1}, 0))))
    refusal(
        filler,
        constraint,
        [SECTION_BEGIN, CALL_BEGIN, "functions.lookaround:0", ARGUMENT_BEGIN],
        ['{"code": "a", "n": "one"}'],
    )
