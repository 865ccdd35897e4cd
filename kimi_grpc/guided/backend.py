"""The grammar-engine interface guided decoding is written against (one engine today: llguidance).

A backend turns grammar text into a compiled grammar once (cached by text), gives each sequence
its own matcher, and fills one step's token masks for many matchers at once. Masks are packed
bitmasks: ``int32 [rows, ceil(V / 32)]``, bit ``t % 32`` of word ``t // 32`` set = token ``t``
allowed (the layout llguidance and xgrammar share).

Grammars are Lark text in llguidance's dialect (``%json {schema}`` for a JSON-schema value,
``<|name|>`` for a special token by name); :mod:`kimi_grpc.guided.tool_grammar` writes them.
Swapping the engine means implementing this protocol and accepting that dialect.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class GrammarError(ValueError):
    """A grammar or schema the engine cannot compile; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Matcher(Protocol):
    """One sequence's position in a grammar. Never raises on a bad token: it enters an error
    state (``error()`` non-empty) and stays there."""

    def consume(self, token_id: int) -> bool: ...
    def is_accepting(self) -> bool: ...
    def is_stopped(self) -> bool: ...
    def error(self) -> str: ...


class CompiledGrammar(Protocol):
    def matcher(self) -> Matcher:
        """A fresh matcher at the grammar's start (cheap: a copy of a prototype)."""
        ...


class GrammarBackend(Protocol):
    vocab_size: int  # mask width in tokens (the model's vocabulary, padding ids included)

    def compile(self, grammar: str) -> CompiledGrammar:
        """Validates and compiles; raises :class:`GrammarError` (field ``"grammar"``). Cached."""
        ...

    def json_schema_problems(self, schema: dict[str, Any], *, lenient: bool) -> list[str]:
        """Why ``schema`` cannot be enforced exactly (strict) or at all (lenient); [] if it can."""
        ...

    def fill_masks(self, rows: list[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """Writes each matcher's next-token mask into ``bitmask[row]`` (int32 ``[R, W]``, C
        order). Runs on native threads with the GIL released."""
        ...


def mask_words(vocab_size: int) -> int:
    """int32 words per packed mask row."""
    return (vocab_size + 31) // 32
