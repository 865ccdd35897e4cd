"""What one completion may sample next: reasoning rules, then a grammar (or a plain ban list).

A request's :class:`Constraint` is shared by its ``n`` completions; each completion (engine
sequence) gets its own :class:`Guide`, which owns one matcher and follows that completion's own
tokens only, so a row's mask never depends on the rest of the batch.

One owner for reasoning. While the completion is thinking no grammar runs: only the bare call
markers and ``<think>`` are banned (plus the stop ids when the grammar needs a non-empty answer).
The grammar takes over when the model samples ``</think>`` (the matcher starts after it) or
``<|tool_calls_section_begin|>`` (that token is the matcher's first token, when the grammar can
start with it; otherwise it is banned while thinking). A forced ``</think>`` (the thinking budget)
is a new engine request whose constraint starts after reasoning. A constraint that does not start
in reasoning (INSTANT mode, Generate) is constrained from the first token.

Token bookkeeping is by count (``num_consumed``): :meth:`Guide.sync` feeds only the completion's
tokens it has not seen, so recomputation after preemption, repeated calls and forced tokens can
never feed a token twice; a shorter output (discarded tokens) replays the guide from the start.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_grpc.guided.backend import CompiledGrammar, Matcher


@dataclass(frozen=True)
class Constraint:
    """One request's constraint. ``grammar`` is the suffix after reasoning (None: no grammar,
    only ``banned`` outside reasoning, e.g. tool_choice none)."""

    grammar: CompiledGrammar | None
    start_in_reasoning: bool = False
    reasoning_end_id: int | None = None  # </think>
    section_begin_id: int | None = None  # hands over to the grammar from reasoning, when allowed
    reasoning_banned: tuple[int, ...] = ()  # never sampled while reasoning
    banned: tuple[int, ...] = ()  # never sampled after reasoning when there is no grammar
    stops_in_reasoning: bool = True  # may the completion end while still reasoning?

    @property
    def uses_grammar(self) -> bool:
        return self.grammar is not None


class GuideError(RuntimeError):
    """The completion produced a token its grammar refuses (it fails; never runs unconstrained)."""


class Guide:
    def __init__(self, constraint: Constraint) -> None:
        self.constraint = constraint
        self.reasoning = constraint.start_in_reasoning
        self.matcher: Matcher | None = None
        if not self.reasoning and constraint.grammar is not None:
            self.matcher = constraint.grammar.matcher()
        self.num_consumed = 0  # completion tokens seen

    @property
    def in_structure(self) -> bool:
        """Inside text the grammar has not closed (a tool section, a JSON value): stop strings
        must not cut it."""
        return self.matcher is not None and not self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing but the end."""
        return self.matcher is not None and self.matcher.is_stopped()

    def banned_ids(self) -> tuple[int, ...]:
        """Ids to mask when the row has no matcher (reasoning, or a grammar-less constraint)."""
        c = self.constraint
        return c.reasoning_banned if self.reasoning else c.banned

    def sync(self, output_token_ids: list[int], stop_token_ids: frozenset[int]) -> None:
        """Feeds the completion's tokens not seen yet (stop ids end the completion and are not
        fed). Raises :class:`GuideError` on a token the grammar refuses."""
        if len(output_token_ids) < self.num_consumed:  # tokens were discarded: replay
            self.__dict__.update(Guide(self.constraint).__dict__)
        for token in output_token_ids[self.num_consumed :]:
            self.num_consumed += 1
            if token not in stop_token_ids:
                self._consume(token)

    def _consume(self, token: int) -> None:
        c = self.constraint
        if self.reasoning:
            if token == c.reasoning_end_id:
                self._leave_reasoning(first=None)
            elif token == c.section_begin_id and c.grammar is not None:
                self._leave_reasoning(first=token)
            return
        if self.matcher is not None and not self.matcher.consume(token):
            raise GuideError(self.matcher.error() or f"token {token} refused by the grammar")

    def _leave_reasoning(self, first: int | None) -> None:
        self.reasoning = False
        grammar = self.constraint.grammar
        if grammar is None:
            return
        self.matcher = grammar.matcher()
        if first is not None and not self.matcher.consume(first):
            raise GuideError(self.matcher.error() or "the grammar cannot start with a section")
