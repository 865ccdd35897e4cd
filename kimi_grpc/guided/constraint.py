"""Tools / tool_choice / response format -> the engine :class:`Constraint` (for any front end).

The rules (one place for gRPC and any later HTTP front):

* guided decoding on, tools or a response format declared: the Kimi tool-call grammar
  (:mod:`kimi_grpc.guided.tool_grammar`) compiled for this request; while thinking only the bare
  call markers and ``<think>`` are banned.
* tool_choice none: the five tool markers can never be sampled (-inf, not a bias), grammar or not.
* guided decoding off: no grammar (the caller refuses a response format it cannot enforce).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_grpc.guided.backend import GrammarBackend, GrammarError
from kimi_grpc.guided.guide import Constraint
from kimi_grpc.guided.masks import GuidedStats
from kimi_grpc.guided.tool_grammar import MARKERS, SECTION_BEGIN, GrammarBuilder
from kimi_grpc.tokenizer import KimiTokenizer

logger = logging.getLogger(__name__)

THINK_BEGIN, THINK_END = "<think>", "</think>"


def _ids(tokenizer: KimiTokenizer, names: Sequence[str]) -> tuple[int, ...]:
    ids = [tokenizer.token_id(name) for name in names]
    missing = [n for n, i in zip(names, ids, strict=True) if i is None]
    if missing:
        raise GrammarError("tools", f"this model's tokenizer lacks {', '.join(missing)}")
    return tuple(ids)  # type: ignore[arg-type]


def build_constraint(
    backend: GrammarBackend | None,
    tokenizer: KimiTokenizer,
    stats: GuidedStats,
    *,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str,
    function_name: str | None = None,
    parallel_tool_calls: bool = True,
    response_schema: Mapping[str, Any] | None = None,
    first_call_index: int | None = None,
    thinking: bool = False,
    guided: bool = True,
    tools_field: str = "tools",
    response_field: str = "response_format",
) -> Constraint | None:
    """``tool_choice``: "auto" | "required" | "none" (``function_name``: exactly one call of it);
    ``thinking``: the output starts inside reasoning; ``guided``: use a grammar (needs
    ``backend``). Raises :class:`GrammarError` (with the request field) for a schema that cannot
    be compiled even leniently. Blocking (compiles take milliseconds): call it off the event
    loop."""
    markers = _ids(tokenizer, MARKERS)
    think_begin, think_end = _ids(tokenizer, (THINK_BEGIN, THINK_END))
    section_begin = markers[MARKERS.index(SECTION_BEGIN)]
    banned = markers if tool_choice == "none" else ()
    grammar = None
    if guided and backend is not None:
        built = GrammarBuilder(backend).build(
            tools=tools,
            tool_choice=tool_choice,
            function_name=function_name,
            parallel_tool_calls=parallel_tool_calls,
            response_schema=response_schema,
            first_call_index=first_call_index,
            tools_field=tools_field,
            response_field=response_field,
        )
        if built is not None:
            for field, problems in built.lenient:
                logger.warning("%s: compiled leniently (not enforced: %s)", field, problems)
            stats.add(lenient_fallbacks=len(built.lenient))
            grammar = built.compiled
    if grammar is None and not banned:
        return None
    if grammar is None:  # tool_choice none without a grammar: the markers are banned throughout
        return Constraint(
            None,
            start_in_reasoning=thinking,
            reasoning_end_id=think_end,
            reasoning_banned=(*markers, think_begin),
            banned=banned,
        )
    probe = grammar.matcher()
    accepts_empty = probe.is_accepting()  # may the answer after reasoning be empty?
    opens_with_section = probe.consume(section_begin)
    reasoning_banned = [m for m in markers if m != section_begin or not opens_with_section]
    return Constraint(
        grammar,
        start_in_reasoning=thinking,
        reasoning_end_id=think_end,
        section_begin_id=section_begin if opens_with_section else None,
        reasoning_banned=(*reasoning_banned, think_begin),
        stops_in_reasoning=accepts_empty,
    )
