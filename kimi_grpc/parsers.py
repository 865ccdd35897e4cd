"""Kimi K2.5/K2.6 output parsing: reasoning, content and tool calls, one-shot and streaming.

The model output (decoded with think tags and tool markers kept as text) reads::

    reasoning</think>content<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0
    <|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>content

There is one implementation: :func:`parse_output` feeds the whole text to a :class:`StreamParser`,
which makes one O(n) pass with an explicit state machine (start: REASONING if ``thinking``)::

    REASONING --</think>--> CONTENT     CONTENT --<think> before any content--> REASONING
    REASONING|CONTENT --section begin--> SECTION --section end--> CONTENT
    REASONING|CONTENT|SECTION --call begin--> CALL_ID --argument begin--> ARGS --call end--> SECTION
    ARGS --call begin|section begin|section end--> call kept (reported), marker redone in SECTION
    CALL_ID --call end--> call with "{}"    CALL_ID --other tool marker, or end--> call dropped

Rules beyond the states (problems are reported in ``ParsedOutput.errors``, never raised):

* ``reasoning`` and ``content`` are stripped of surrounding whitespace; every special-token string
  (:data:`MARKERS`) is removed from them, repeatedly, so none can be formed by a removal either.
* Arguments are the raw text between the markers, stripped, ``"{}"`` when empty; malformed JSON
  is passed through. Inside ids and arguments only the tool markers are structure.
* Text inside a section but outside calls is dropped. Text after a section is content.
* Ids become ``functions.{name}:{N}``. ``functions.NAME:N``, ``NAME:N``, ``functions.NAME`` and a
  declared ``NAME`` name the tool (kept whole: ``web.search``); for a bare counter ``N`` or a client
  id (``call_abc``) the tool is the only declared one, else the unique declared tool whose schema
  fits the arguments (required keys present, no undeclared keys), else unresolved: name ``""``.
  N is the model's counter, else ``first_call_index + index``; a duplicate id takes the next N.
* Streaming holds back only possible marker prefixes and whitespace that may be stripped; a call's
  first delta (id + name) goes out at its argument marker, or, when the name must be inferred
  from the arguments, at the end of the call together with all its arguments.

Token mode (``StreamParser(markers_as_tokens=True)``): in text mode a marker is recognised wherever
its spelling appears, so a tool argument that quotes ``<|tool_call_end|>`` (as ordinary BPE tokens)
splits the call. In token mode the caller says which text is the text of one special token
(:meth:`StreamParser.feed_marker`) and which is ordinary (:meth:`StreamParser.feed_text`; see
:class:`kimi_grpc.special_text.SpecialTokenText`). Ordinary text is never structure and is kept
verbatim (reasoning and content are only stripped). A special token's text means what its spelling
means in text mode at that point (structure, or kept as argument/id text inside a call); where
text mode would remove it from reasoning or content it is dropped, as is the text of any special
token that is not in :data:`MARKERS` (e.g. a reserved slot). With no marker spelling inside
ordinary text, both modes give the same result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MARKERS",
    "ParsedOutput",
    "StreamDelta",
    "StreamParser",
    "ToolCall",
    "ToolCallDelta",
    "parse_output",
]

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
SPECIAL_TOKENS = (
    "[BOS]", "[EOS]", "[EOT]", "[UNK]", "[PAD]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>",
    "<|im_system|>", "<|im_middle|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
)  # fmt: skip
# marker text -> its role; vLLM also accepts the singular "tool_call_section" spelling.
_TOOL_ROLES = {
    SECTION_BEGIN: SECTION_BEGIN,
    "<|tool_call_section_begin|>": SECTION_BEGIN,
    SECTION_END: SECTION_END,
    "<|tool_call_section_end|>": SECTION_END,
    CALL_BEGIN: CALL_BEGIN,
    ARGUMENT_BEGIN: ARGUMENT_BEGIN,
    CALL_END: CALL_END,
}
_TEXT_ROLES = {**_TOOL_ROLES, THINK_BEGIN: THINK_BEGIN, THINK_END: THINK_END}
_TEXT_ROLES.update(dict.fromkeys(SPECIAL_TOKENS, ""))
MARKERS: tuple[str, ...] = tuple(_TEXT_ROLES)  # never in reasoning or content

_REASONING, _CONTENT, _SECTION, _CALL_ID, _ARGS = range(5)
_NAMED_ID = re.compile(r"(?:functions\.)?([^\s:]+):([0-9]{1,18})")
_BARE_ID = re.compile(r"[0-9]{1,18}")
_PREFIXED_NAME = re.compile(r"functions\.([^\s:]+)")
_UNRESOLVED = "no declared tool matches its id and arguments (name left empty)"
_OPENERS = re.compile(r"[<\[]")  # every marker starts with one of these and has no other


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: ``id`` is always ``functions.{name}:{N}``; ``arguments`` is the raw text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Streamed piece of call ``index`` (dense, 0-based); only its first delta has id and name."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class StreamDelta:
    """Text to append to each field since the previous delta."""

    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class ParsedOutput:
    """A whole parsed output; ``errors`` lists human-readable problems (nothing is raised)."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    errors: list[str]


_NO_DELTA = StreamDelta()


class _Lexicon:
    """The markers that are structure in a state: a search regex and their proper prefixes."""

    def __init__(self, roles: dict[str, str]) -> None:
        self.roles = roles
        self.regex = re.compile("|".join(map(re.escape, roles)))  # no marker prefixes another
        self.prefixes = frozenset(m[:k] for m in roles for k in range(1, len(m)))
        self.longest = max(map(len, roles))


_TEXT_LEXICON = _Lexicon(_TEXT_ROLES)
_CALL_LEXICON = _Lexicon(_TOOL_ROLES)


class _Strip:
    """Streams ``"".join(pushed).strip()``: leading whitespace dropped, trailing held back."""

    def __init__(self) -> None:
        self.parts: list[str] = []  # the output so far
        self._taken = 0  # parts already handed out by take()
        self._started = False
        self._held: list[str] = []

    def take(self) -> str:
        """The output added since the previous take()."""
        parts, taken, n = self.parts, self._taken, len(self.parts)
        self._taken = n
        return "" if taken == n else parts[taken] if n - taken == 1 else "".join(parts[taken:])

    def push(self, text: str) -> str:
        if self._started and not self._held and text and not text[-1].isspace():
            self.parts.append(text)  # the common case
            return text
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        core = text.rstrip()
        if not core:
            self._held.append(text)
            return ""
        out = "".join(self._held) + core if self._held else core
        self._held.clear()
        if len(core) < len(text):
            self._held.append(text[len(core) :])
        self.parts.append(out)
        return out

    def close(self) -> None:
        """No more text: only strippable whitespace can be held, and it is dropped."""


class _TextSink(_Strip):
    """A reasoning/content stream: removes every marker (to a fixpoint), then strips.

    Removal works like a stack: held-back text is a chain of marker prefixes; a completed marker
    pops its prefix, which re-exposes the one below (so ``<th<think>ink>`` leaves nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self._chain: list[str] = []

    def push(self, text: str) -> str:
        if not self._chain and "<" not in text and "[" not in text:
            return _Strip.push(self, text)
        chain, out, i, n = self._chain, [], 0, len(text)
        while i < n:
            if not chain:
                m = _OPENERS.search(text, i)
                if m is None:
                    out.append(text[i:])
                    break
                out.append(text[i : m.start()])
                chain.append(text[m.start()])
                i = m.start() + 1
                continue
            c = text[i]
            i += 1
            grown = chain[-1] + c
            if grown in _TEXT_ROLES:
                chain.pop()
            elif grown in _TEXT_LEXICON.prefixes:
                chain[-1] = grown
            elif c in "<[":
                chain.append(c)
            else:  # nothing held can become a marker any more
                out.extend(chain)
                out.append(c)
                chain.clear()
        return _Strip.push(self, "".join(out))

    def close(self) -> None:
        """No more text: what the chain held is plain text after all."""
        _Strip.push(self, "".join(self._chain))
        self._chain.clear()


@dataclass(eq=False)
class _Call:
    index: int
    counter: int | None
    id: str | None = None  # set once the name is known
    name: str = ""
    args: _Strip = field(default_factory=_Strip)


def _declared(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """name -> parameters schema of OpenAI-style tool declarations (malformed ones skipped)."""
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, Mapping) else {}
    return out


def _fits(args: Any, schema: Mapping[str, Any]) -> bool:
    """Do JSON ``args`` fit a parameters schema: required keys present, no undeclared keys?"""
    if not isinstance(args, dict):
        return False
    props = schema.get("properties")
    required = schema.get("required")
    if isinstance(required, list) and any(key not in args for key in required):
        return False
    extra = schema.get("additionalProperties", False)
    if extra is True or isinstance(extra, Mapping):
        return True
    return all(key in props for key in args) if isinstance(props, Mapping) else not args


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


class StreamParser:
    """Incremental parser: :meth:`feed` text deltas (token mode: :meth:`feed_text` and
    :meth:`feed_marker`), then :meth:`finish` once.

    ``thinking`` says the prompt ended with ``<think>`` (output starts inside reasoning);
    ``tools`` are the request's declarations (used to resolve ids without a name);
    ``first_call_index`` numbers calls whose id has no counter (calls earlier in the chat);
    ``markers_as_tokens`` selects token mode (see the module docstring). In both modes the result
    does not depend on how the text is split into calls, and the deltas concatenate to it.
    """

    def __init__(
        self,
        *,
        thinking: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        first_call_index: int = 0,
        markers_as_tokens: bool = False,
    ) -> None:
        self._markers_as_tokens = markers_as_tokens
        self._state = _REASONING if thinking else _CONTENT
        self._tools = _declared(tools)
        self._first_call_index = first_call_index
        self._pending = ""  # a possible marker prefix at the end of the text fed so far
        sink = _Strip if markers_as_tokens else _TextSink  # token mode: ordinary text is verbatim
        self._reasoning = sink()
        self._content = sink()
        self._at_start = True  # nothing but whitespace/specials yet: a <think> opens reasoning
        self._explicit_section = False
        self._dropped_text = False
        self._id_parts: list[str] = []
        self._call: _Call | None = None
        self._calls: list[ToolCall] = []
        self._ids: set[str] = set()
        self._errors: list[str] = []
        self._result: ParsedOutput | None = None
        self._out_calls: list[tuple[int, str | None, str | None, list[str]]] = []

    def feed(self, text_delta: str) -> StreamDelta:
        """Text mode: consume the next piece of output; return what can be emitted now."""
        self._check_feed("feed", token_mode=False)
        if not text_delta:
            return _NO_DELTA
        if not self._pending and "<" not in text_delta and "[" not in text_delta:
            call = self._call  # the common case: no marker can start in this delta
            if self._state == _ARGS and call is not None and call.id is not None:
                fragment = call.args.push(text_delta)
                if not fragment:
                    return _NO_DELTA
                return StreamDelta("", "", (ToolCallDelta(call.index, None, None, fragment),))
            self._text(text_delta)
            return self._delta()
        text = self._pending + text_delta
        self._pending = ""
        pos, n = 0, len(text)
        while pos < n:
            lex = _CALL_LEXICON if self._state >= _CALL_ID else _TEXT_LEXICON
            m = lex.regex.search(text, pos)
            if m is None:
                end = max(text.rfind("<", pos), text.rfind("[", pos))
                if end < 0 or n - end >= lex.longest or text[end:] not in lex.prefixes:
                    end = n
                if end > pos:
                    self._text(text[pos:end])
                self._pending = text[end:]
                break
            if m.start() > pos:
                self._text(text[pos : m.start()])
            self._marker(lex.roles[m.group()])
            pos = m.end()
        return self._delta()

    def feed_text(self, text: str) -> StreamDelta:
        """Token mode: consume ordinary (non-special-token) output text; it is never structure."""
        self._check_feed("feed_text", token_mode=True)
        if text:
            self._text(text)
        return self._delta()

    def feed_marker(self, text: str) -> StreamDelta:
        """Token mode: consume the text of exactly one special token. A known marker is structure
        where text mode would treat its spelling as structure; inside a call id or arguments any
        other special token's text is kept as text (as in text mode); anything else is dropped."""
        self._check_feed("feed_marker", token_mode=True)
        if self._state >= _CALL_ID:
            role = _TOOL_ROLES.get(text)
            if role is None:
                self._text(text)
            else:
                self._marker(role)
        elif role := _TEXT_ROLES.get(text):
            self._marker(role)
        return self._delta()

    def finish(self) -> StreamDelta:
        """End of output: flush held-back text, close what is open; :attr:`result` is then set."""
        if self._result is not None:
            raise RuntimeError("StreamParser.finish() called twice")
        if self._pending:
            self._text(self._pending)
            self._pending = ""
        state = self._state
        if state == _REASONING:
            self._errors.append("output ended inside reasoning (no </think>)")
        elif state == _CALL_ID:
            self._drop_call("output ended")
        elif state == _ARGS:
            self._end_call(terminated=False)
        if state >= _SECTION and self._explicit_section:
            self._errors.append("tool-call section not closed")
        self._reasoning.close()
        self._content.close()
        self._result = ParsedOutput(
            "".join(self._reasoning.parts),
            "".join(self._content.parts),
            self._calls,
            self._errors,
        )
        return self._delta()

    @property
    def result(self) -> ParsedOutput:
        """The whole parsed output; available after :meth:`finish`."""
        if self._result is None:
            raise RuntimeError("StreamParser.result read before finish()")
        return self._result

    def _check_feed(self, method: str, *, token_mode: bool) -> None:
        if self._result is not None:
            raise RuntimeError(f"StreamParser.{method}() after finish()")
        if self._markers_as_tokens != token_mode:
            use = "feed_text()/feed_marker()" if self._markers_as_tokens else "feed()"
            mode = "token" if self._markers_as_tokens else "text"
            raise RuntimeError(f"StreamParser.{method}() in {mode} mode: use {use}")

    # -- the state machine ----------------------------------------------------------------------

    def _text(self, text: str) -> None:
        state = self._state
        if state == _ARGS:
            call = self._call
            assert call is not None
            fragment = call.args.push(text)
            if fragment and call.id is not None:
                self._emit_args(call.index, fragment)
        elif state == _CONTENT:
            if self._at_start and not text.isspace():
                self._at_start = False
            self._content.push(text)
        elif state == _REASONING:
            self._reasoning.push(text)
        elif state == _CALL_ID:
            self._id_parts.append(text)
        elif not self._dropped_text and not text.isspace():
            self._dropped_text = True
            self._errors.append("text inside a tool-call section, outside calls, dropped")

    def _marker(self, role: str) -> None:
        state = self._state
        if state >= _CALL_ID:
            if role == ARGUMENT_BEGIN:
                if state == _CALL_ID:
                    self._start_args()
                else:
                    call = self._call
                    assert call is not None
                    label = call.id or f"#{call.index}"
                    self._errors.append(f"tool call {label}: stray {role} dropped")
                return
            if role == CALL_END:
                if state == _CALL_ID:
                    self._start_args()
                self._end_call(terminated=True)
            elif state == _CALL_ID:
                self._drop_call(f"{role} came")
            else:
                self._end_call(terminated=False)
            self._state = _SECTION
            if role != CALL_END:
                self._marker(role)  # what the interrupting marker means in the section
            return
        if role == THINK_BEGIN and state == _CONTENT and self._at_start:
            new_state = _REASONING
        elif role == THINK_END and state == _REASONING:
            new_state = _CONTENT
        elif role == SECTION_BEGIN and state != _SECTION:
            new_state, self._explicit_section = _SECTION, True
        elif role == SECTION_END and state == _SECTION:
            new_state = _CONTENT
        elif role == CALL_BEGIN:
            new_state = _CALL_ID
            if state != _SECTION:
                self._explicit_section = False  # calls without a section begin
        else:  # a marker with no meaning here: removed
            return
        if state == _REASONING:  # reasoning never reopens: flush what it held back
            self._reasoning.close()
        self._at_start = False
        self._state = new_state

    def _start_args(self) -> None:
        raw = "".join(self._id_parts).strip()
        self._id_parts.clear()
        name: str | None = None
        counter: int | None = None
        if m := _NAMED_ID.fullmatch(raw):
            name, counter = m[1], int(m[2])
        elif _BARE_ID.fullmatch(raw):
            counter = int(raw)
        elif m := _PREFIXED_NAME.fullmatch(raw):
            name = m[1]
        elif raw in self._tools:
            name = raw
        self._call = call = _Call(len(self._calls), counter)
        if name is not None:
            self._name_call(call, name)
            if self._tools and name not in self._tools:
                self._errors.append(f"tool call {call.id}: {name!r} is not a declared tool")
        elif len(self._tools) <= 1:  # the arguments cannot change which tool it is
            self._name_call(call, next(iter(self._tools), ""))
            if not self._tools:
                self._errors.append(f"tool call {call.id}: {_UNRESOLVED}")
        self._state = _ARGS

    def _name_call(self, call: _Call, name: str) -> None:
        n = call.counter if call.counter is not None else self._first_call_index + call.index
        call_id = f"functions.{name}:{n}"
        if call_id in self._ids:
            while f"functions.{name}:{n}" in self._ids:
                n += 1
            self._errors.append(f"duplicate tool call id {call_id} renumbered to :{n}")
            call_id = f"functions.{name}:{n}"
        self._ids.add(call_id)
        call.id, call.name = call_id, name
        self._out_calls.append((call.index, call_id, name, []))

    def _end_call(self, *, terminated: bool) -> None:
        call = self._call
        assert call is not None
        self._call = None
        args = "".join(call.args.parts)
        valid, value = _loads(args) if args else (True, {})
        if call.id is None:
            fits = [n for n, schema in self._tools.items() if _fits(value, schema)]
            self._name_call(call, fits[0] if len(fits) == 1 else "")
            if len(fits) != 1:
                self._errors.append(f"tool call {call.id}: {_UNRESOLVED}")
            self._emit_args(call.index, args)
        if not args:
            args = "{}"
            self._emit_args(call.index, args)
        if not terminated:
            self._errors.append(f"tool call {call.id}: no {CALL_END} (truncated?)")
        if not valid:
            self._errors.append(f"tool call {call.id}: arguments are not valid JSON")
        elif not isinstance(value, dict):
            self._errors.append(f"tool call {call.id}: arguments are not a JSON object")
        assert call.id is not None
        self._calls.append(ToolCall(call.id, call.name, args))

    def _drop_call(self, why: str) -> None:
        raw = "".join(self._id_parts).strip()
        self._id_parts.clear()
        self._errors.append(f"tool call {raw!r} dropped: {why} before {ARGUMENT_BEGIN}")

    # -- emission -------------------------------------------------------------------------------

    def _emit_args(self, index: int, fragment: str) -> None:
        if fragment:
            if self._out_calls and self._out_calls[-1][0] == index:
                self._out_calls[-1][3].append(fragment)
            else:
                self._out_calls.append((index, None, None, [fragment]))

    def _delta(self) -> StreamDelta:
        reasoning, content, calls = self._reasoning.take(), self._content.take(), self._out_calls
        if not (reasoning or content or calls):
            return _NO_DELTA
        tool_calls = tuple(ToolCallDelta(i, d, n, "".join(a)) for i, d, n, a in calls)
        calls.clear()
        return StreamDelta(reasoning, content, tool_calls)


def parse_output(
    text: str,
    *,
    thinking: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
    first_call_index: int = 0,
) -> ParsedOutput:
    """Parse a whole output: the same result as streaming it through :class:`StreamParser`."""
    parser = StreamParser(thinking=thinking, tools=tools, first_call_index=first_call_index)
    parser.feed(text)
    parser.finish()
    return parser.result
