"""Kimi K2.6 reasoning + tool-call parsing: a hand-written corpus, and streaming == one-shot.

Every corpus output has its exact expected ParsedOutput written by hand. Each one is also
streamed split at every point (two pieces), at every pair of points (three pieces, outputs up to
~120 chars), char by char and at random points: the result must equal the expected one, and the
deltas must concatenate to it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_grpc.parsers import (
    MARKERS,
    ParsedOutput,
    StreamDelta,
    StreamParser,
    ToolCall,
    parse_output,
)

TB, TE = "<think>", "</think>"
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
NOT_CLOSED = "tool-call section not closed"
IN_REASONING = "output ended inside reasoning (no </think>)"
UNRESOLVED = "no declared tool matches its id and arguments (name left empty)"


def tool(name: str, props: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> dict:
    params = {"type": "object", "properties": {p: {"type": "string"} for p in props}}
    if required:
        params["required"] = list(required)
    return {"type": "function", "function": {"name": name, "parameters": params}}


WEATHER = tool("get_weather", ("city", "unit"), ("city",))
TIME = tool("get_time", ("tz",))
SEARCH = tool("web.search", ("query",), ("query",))
NOOP = tool("noop")
TOOLS = [WEATHER, TIME, SEARCH]
BIG = json.dumps({"code": "x = 1\n" * 17_000})  # ~100 KB of arguments


def out(reasoning="", content="", calls=(), errors=()) -> ParsedOutput:
    return ParsedOutput(reasoning, content, [ToolCall(*c) for c in calls], list(errors))


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    expected: ParsedOutput
    thinking: bool = True
    tools: tuple[dict, ...] | None = tuple(TOOLS)
    first_call_index: int = 0

    def kwargs(self) -> dict:
        return dict(
            thinking=self.thinking, tools=self.tools, first_call_index=self.first_call_index
        )


W0 = ("functions.get_weather:0", "get_weather", '{"city": "Beijing"}')
CORPUS = [
    Case(
        "spec_example",
        f"I should check.</think>Let me look.{SB}{CB}functions.get_weather:0{AB}"
        f'{{"city": "Beijing"}}{CE}{CB}functions.get_time:1{AB}{{}}{CE}{SE}',
        out("I should check.", "Let me look.", [W0, ("functions.get_time:1", "get_time", "{}")]),
    ),
    Case("reemitted_think", f"{TB}\nplan\n{TE}\n\nanswer", out("plan", "answer")),
    Case("reasoning_truncated", "still thinking ", out("still thinking", errors=[IN_REASONING])),
    Case(
        "reasoning_ended_by_section",
        f'need weather\n{SB}{CB}functions.get_weather:0{AB}{{"city": "Beijing"}}{CE}{SE}',
        out("need weather", calls=[W0]),
    ),
    Case(
        "reasoning_ended_by_call",
        f"need time{CB}functions.get_time:0{AB}{{}}{CE}",
        out("need time", calls=[("functions.get_time:0", "get_time", "{}")]),
    ),
    Case("thinking_off_content", " Hello there.\n", out(content="Hello there."), thinking=False),
    Case("thinking_off_leading_think", f"\n{TB}hmm{TE}\n\nHi!", out("hmm", "Hi!"), thinking=False),
    Case("thinking_off_late_think", f"A {TB}B{TE} C", out(content="A B C"), thinking=False),
    Case(
        "content_around_section_and_whitespace",
        f"Checking now.\n{SB}\n{CB} functions.get_weather:0 {AB} "
        f'{{"city": "Beijing"}} \n{CE}\n{SE}\nDone.',
        out(content="Checking now.\n\nDone.", calls=[W0]),
        thinking=False,
    ),
    Case(
        "several_sections",
        f'{SB}{CB}functions.get_weather:0{AB}{{"city": "Beijing"}}{CE}{SE}mid'
        f'{SB}{CB}functions.get_weather:1{AB}{{"city":"B"}}{CE}{SE}',
        out(content="mid", calls=[W0, ("functions.get_weather:1", "get_weather", '{"city":"B"}')]),
        thinking=False,
    ),
    Case(
        "argument_100kb",
        f"big one{TE}{SB}{CB}functions.write:0{AB}{BIG}{CE}{SE}",
        out("big one", calls=[("functions.write:0", "write", BIG)]),
        tools=None,
    ),
    Case(
        "name_without_prefix",
        f'{SB}{CB}get_weather:3{AB}{{"city": "X"}}{CE}{SE}',
        out(calls=[("functions.get_weather:3", "get_weather", '{"city": "X"}')]),
        thinking=False,
    ),
    Case(
        "dotted_name",
        f'r{TE}{SB}{CB}functions.web.search:0{AB}{{"query": "kimi"}}{CE}{SE}',
        out("r", calls=[("functions.web.search:0", "web.search", '{"query": "kimi"}')]),
    ),
    Case(
        "hyphenated_name_no_tools",
        f"{SB}{CB}functions.get-weather:2{AB}{{}}{CE}{SE}",
        out(calls=[("functions.get-weather:2", "get-weather", "{}")]),
        thinking=False,
        tools=None,
    ),
    Case(
        "bare_counter_inferred",
        f'{SB}{CB}3{AB}{{"query": "x"}}{CE}{SE}',
        out(calls=[("functions.web.search:3", "web.search", '{"query": "x"}')]),
        thinking=False,
    ),
    Case(
        "client_id_inferred_first_call_index",
        f'ok{TE}{SB}{CB}call_abc123{AB}{{"city": "Rome"}}{CE}{SE}',
        out("ok", calls=[("functions.get_weather:4", "get_weather", '{"city": "Rome"}')]),
        first_call_index=4,
    ),
    Case(
        "client_id_only_tool",
        f'{SB}{CB}toolu_01X{AB}{{"city": "x"}}{CE}{SE}',
        out(calls=[("functions.get_time:0", "get_time", '{"city": "x"}')]),
        thinking=False,
        tools=(TIME,),
    ),
    Case(
        "unresolved_no_tools",
        f"{SB}{CB}2{AB}{{}}{CE}{SE}",
        out(calls=[("functions.:2", "", "{}")], errors=[f"tool call functions.:2: {UNRESOLVED}"]),
        thinking=False,
        tools=None,
    ),
    Case(
        "unresolved_ambiguous",
        f"{SB}{CB}call_9{AB}{{}}{CE}{SE}",
        out(calls=[("functions.:0", "", "{}")], errors=[f"tool call functions.:0: {UNRESOLVED}"]),
        thinking=False,
        tools=(TIME, NOOP),
    ),
    Case(
        "declared_name_as_id",
        f"{SB}{CB}get_time{AB}{{}}{CE}{CB}functions.get_time{AB}{{}}{CE}{SE}",
        out(
            calls=[
                ("functions.get_time:2", "get_time", "{}"),
                ("functions.get_time:3", "get_time", "{}"),
            ]
        ),
        thinking=False,
        first_call_index=2,
    ),
    Case(
        "duplicate_ids",
        f"{SB}{CB}functions.get_time:0{AB}{{}}{CE}{CB}functions.get_time:0{AB}{{}}{CE}"
        f"{CB}functions.get_time:1{AB}{{}}{CE}{SE}",
        out(
            calls=[(f"functions.get_time:{i}", "get_time", "{}") for i in range(3)],
            errors=[
                "duplicate tool call id functions.get_time:0 renumbered to :1",
                "duplicate tool call id functions.get_time:1 renumbered to :2",
            ],
        ),
        thinking=False,
    ),
    Case(
        "malformed_json_passed_through",
        f'{SB}{CB}functions.get_weather:0{AB}{{"city": "Beijing"{CE}'
        f'{CB}functions.get_weather:1{AB}["a"]{CE}{SE}',
        out(
            calls=[
                ("functions.get_weather:0", "get_weather", '{"city": "Beijing"'),
                ("functions.get_weather:1", "get_weather", '["a"]'),
            ],
            errors=[
                "tool call functions.get_weather:0: arguments are not valid JSON",
                "tool call functions.get_weather:1: arguments are not a JSON object",
            ],
        ),
        thinking=False,
    ),
    Case(
        "truncated_in_arguments",
        f'r{TE}c{SB}{CB}functions.get_weather:0{AB}{{"city": "Bei',
        out(
            "r",
            "c",
            [("functions.get_weather:0", "get_weather", '{"city": "Bei')],
            [
                f"tool call functions.get_weather:0: no {CE} (truncated?)",
                "tool call functions.get_weather:0: arguments are not valid JSON",
                NOT_CLOSED,
            ],
        ),
    ),
    Case(
        "truncated_in_id",
        f"{SB}{CB}functions.get_wea",
        out(
            errors=[f"tool call 'functions.get_wea' dropped: output ended before {AB}", NOT_CLOSED]
        ),
        thinking=False,
    ),
    Case(
        "empty_arguments_and_no_argument_marker",
        f"{SB}{CB}functions.get_time:0{AB}  \n {CE}{CB}functions.get_time:1{CE}{SE}",
        out(
            calls=[
                ("functions.get_time:0", "get_time", "{}"),
                ("functions.get_time:1", "get_time", "{}"),
            ]
        ),
        thinking=False,
    ),
    Case(
        "text_in_section_not_content",
        f"{SB}I will call\n{CB}functions.get_time:0{AB}{{}}{CE} junk {SE}after",
        out(
            content="after",
            calls=[("functions.get_time:0", "get_time", "{}")],
            errors=["text inside a tool-call section, outside calls, dropped"],
        ),
        thinking=False,
    ),
    Case(
        "special_tokens_stripped",
        "[BOS]Hello[EOS] there<|im_end|><|im_user|><|im_assistant|><|im_system|><|im_middle|>"
        "[EOT]<|start_header_id|><|end_header_id|>!",
        out(content="Hello there!"),
        thinking=False,
    ),
    Case(
        "stray_markers_stripped",
        f"r1{TB}r2{CE}r3{TE}a{CE}b{SE}c{TE}d{AB}e",
        out("r1r2r3", "abcde"),
    ),
    Case(
        "singular_section_markers",
        f"<|tool_call_section_begin|>{CB}functions.get_time:0{AB}{{}}{CE}<|tool_call_section_end|>after",
        out(content="after", calls=[("functions.get_time:0", "get_time", "{}")]),
        thinking=False,
    ),
    Case(
        "call_without_end_followed_by_call",
        f'{SB}{CB}functions.get_weather:0{AB}{{"city": "Beijing"}}'
        f"{CB}functions.get_time:1{AB}{{}}{CE}{SE}",
        out(
            calls=[W0, ("functions.get_time:1", "get_time", "{}")],
            errors=[f"tool call functions.get_weather:0: no {CE} (truncated?)"],
        ),
        thinking=False,
    ),
    Case(
        "section_end_interrupts_arguments",
        f'{SB}{CB}functions.get_time:0{AB}{{"tz": 1{SE}after',
        out(
            content="after",
            calls=[("functions.get_time:0", "get_time", '{"tz": 1')],
            errors=[
                f"tool call functions.get_time:0: no {CE} (truncated?)",
                "tool call functions.get_time:0: arguments are not valid JSON",
            ],
        ),
        thinking=False,
    ),
    Case(
        "section_end_interrupts_id",
        f"{SB}{CB}functions.get_time:0{SE}x",
        out(
            content="x", errors=[f"tool call 'functions.get_time:0' dropped: {SE} came before {AB}"]
        ),
        thinking=False,
    ),
    Case(
        "markers_formed_by_removal_also_removed",
        "<th<think>ink>ok <|im_<|im_end|>end|>[EO[EOS]S]",
        out(content="ok"),
        thinking=False,
    ),
    Case(
        "marker_look_alikes_kept",
        "a < b and [x] <|unknown|> <thinking> [EOS",
        out(content="a < b and [x] <|unknown|> <thinking> [EOS"),
        thinking=False,
    ),
    Case(
        "arguments_are_raw",
        f'{SB}{CB}functions.web.search:0{AB}{{"query": "{TB}x{TE} [EOS] <|im_end|>"}}{CE}{SE}',
        out(
            calls=[
                (
                    "functions.web.search:0",
                    "web.search",
                    f'{{"query": "{TB}x{TE} [EOS] <|im_end|>"}}',
                )
            ]
        ),
        thinking=False,
    ),
    Case(
        "undeclared_name_kept",
        f"{SB}{CB}functions.delete_all:0{AB}{{}}{CE}{SE}",
        out(
            calls=[("functions.delete_all:0", "delete_all", "{}")],
            errors=["tool call functions.delete_all:0: 'delete_all' is not a declared tool"],
        ),
        thinking=False,
    ),
    Case(
        "stray_argument_marker_in_arguments",
        f"{SB}{CB}functions.get_time:0{AB}{{}}{AB}{CE}{SE}",
        out(
            calls=[("functions.get_time:0", "get_time", "{}")],
            errors=[f"tool call functions.get_time:0: stray {AB} dropped"],
        ),
        thinking=False,
    ),
    Case("empty_output_thinking_off", "", out(), thinking=False),
]
SHORT = [c for c in CORPUS if len(c.text) <= 130]


def stream(pieces: list[str], **kwargs) -> tuple[ParsedOutput, list[StreamDelta]]:
    parser = StreamParser(**kwargs)
    deltas = [parser.feed(p) for p in pieces]
    deltas.append(parser.finish())
    return parser.result, deltas


def check_deltas(deltas: list[StreamDelta], result: ParsedOutput) -> None:
    """Deltas concatenate to the result; a call's first delta (only) carries its id and name."""
    assert "".join(d.reasoning for d in deltas) == result.reasoning
    assert "".join(d.content for d in deltas) == result.content
    args: dict[int, list[str]] = {}
    for d in deltas:
        for t in d.tool_calls:
            if t.index not in args:
                assert t.index == len(args), "call indices are dense and in order"
                call = result.tool_calls[t.index]
                assert (t.id, t.name) == (call.id, call.name)
                args[t.index] = []
            else:
                assert t.id is None and t.name is None
            args[t.index].append(t.arguments)
    assert ["".join(a) for a in args.values()] == [c.arguments for c in result.tool_calls]


def check_split(case: Case, cuts: tuple[int, ...]) -> None:
    bounds = (0, *cuts, len(case.text))
    pieces = [case.text[a:b] for a, b in itertools.pairwise(bounds)]
    result, deltas = stream(pieces, **case.kwargs())
    assert result == case.expected, (case.name, cuts)
    check_deltas(deltas, result)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_one_shot(case: Case) -> None:
    assert parse_output(case.text, **case.kwargs()) == case.expected


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_stream_every_two_piece_split_and_char_by_char(case: Case) -> None:
    step = 1 if len(case.text) < 5000 else 997  # the 100 KB case: a sample of split points
    for cut in range(0, len(case.text) + 1, step):
        check_split(case, (cut,))
    result, deltas = stream(list(case.text), **case.kwargs())
    assert result == case.expected
    check_deltas(deltas, result)


@pytest.mark.parametrize("case", SHORT, ids=lambda c: c.name)
def test_corpus_stream_every_three_piece_split(case: Case) -> None:
    for cuts in itertools.combinations_with_replacement(range(len(case.text) + 1), 2):
        check_split(case, cuts)


def test_corpus_covers_enough() -> None:
    assert len(CORPUS) >= 25 and len(SHORT) >= 15


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corpus_stream_random_splits(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CORPUS))
    n = len(case.text)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=12).map(sorted))
    check_split(case, tuple(cuts))


def test_thinking_flag_decides_where_output_starts() -> None:
    text = f"plan{TE}answer"
    assert parse_output(text, thinking=True) == out("plan", "answer")
    assert parse_output(text, thinking=False) == out(content="plananswer")
    assert parse_output("answer", thinking=False) == out(content="answer")


def test_deltas_go_out_early() -> None:
    parser = StreamParser(thinking=True, tools=TOOLS)
    assert parser.feed("Let me ") == StreamDelta(reasoning="Let me")  # the space may be trailing
    assert parser.feed("think<") == StreamDelta(reasoning=" think")  # "<" may open a marker
    assert parser.feed("/think>Sure") == StreamDelta(content="Sure")
    assert parser.feed("!<|tool_calls_se") == StreamDelta(content="!")
    assert parser.feed(f"ction_begin|>{CB}functions.get_time:0") == StreamDelta()
    first = parser.feed(f'{AB}{{"tz"')
    assert [(t.index, t.id, t.name, t.arguments) for t in first.tool_calls] == [
        (0, "functions.get_time:0", "get_time", '{"tz"')
    ]
    assert parser.feed(': "UTC"}').tool_calls[0].arguments == ': "UTC"}'
    assert parser.feed(f"{CE}{SE}").tool_calls == ()
    assert parser.finish() == StreamDelta()
    assert parser.result.tool_calls == [
        ToolCall("functions.get_time:0", "get_time", '{"tz": "UTC"}')
    ]


def test_inferred_name_is_sent_with_the_whole_call() -> None:
    parser = StreamParser(thinking=False, tools=TOOLS)
    assert parser.feed(f'{SB}{CB}call_1{AB}{{"city": "Rome"}}') == StreamDelta()
    delta = parser.feed(CE)
    assert [(t.id, t.name, t.arguments) for t in delta.tool_calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Rome"}')
    ]


def test_one_megabyte_argument_char_by_char() -> None:
    arg = json.dumps({"data": "ab" * 500_000})
    text = f"r{TE}{SB}{CB}functions.put:0{AB}{arg}{CE}{SE}"
    parser = StreamParser(thinking=True)
    longest_hold = 0
    for ch in text:
        parser.feed(ch)
        longest_hold = max(longest_hold, len(parser._pending))  # never re-reads what it consumed
    parser.finish()
    assert longest_hold < len(AB)
    assert parser.result == out("r", calls=[("functions.put:0", "put", arg)])
    assert parse_output(text, thinking=True) == parser.result


def test_hostile_inputs_are_reported_not_raised() -> None:
    bad_tools = [{"bad": 1}, "x", {"function": {"name": 3}}, {"function": {"name": "f"}}]
    deep = "[" * 100_000
    got = parse_output(f"{SB}{CB}7{AB}{deep}{CE}{SE}", thinking=False, tools=bad_tools)
    assert got == out(
        calls=[("functions.f:7", "f", deep)],
        errors=["tool call functions.f:7: arguments are not valid JSON"],
    )


def test_finish_and_result_misuse() -> None:
    parser = StreamParser(thinking=False)
    with pytest.raises(RuntimeError):
        _ = parser.result
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


FRAGMENTS = [*MARKERS, "functions.get_weather:0", "call_7", "3", "{", "}", '"city": "x"', " ", "\n"]
FRAGMENTS += [m[: len(m) // 2] for m in MARKERS] + [m[len(m) // 2 :] for m in MARKERS]
fuzz_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text("ab <[|>/:{}\n", max_size=4)), max_size=25
).map("".join)


@settings(max_examples=300, deadline=None)
@given(fuzz_text, st.booleans(), st.sampled_from([None, [TIME], TOOLS]), st.data())
def test_fuzz_markers_never_leak_and_stream_matches(text, thinking, tools, data) -> None:
    expected = parse_output(text, thinking=thinking, tools=tools)
    for field in (expected.reasoning, expected.content):
        assert not any(m in field for m in MARKERS), field
    assert len({c.id for c in expected.tool_calls}) == len(expected.tool_calls)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in itertools.pairwise((0, *cuts, len(text)))]
    result, deltas = stream(pieces, thinking=thinking, tools=tools)
    assert result == expected
    check_deltas(deltas, result)
