"""llguidance behind :class:`~kimi_grpc.guided.backend.GrammarBackend`.

Why llguidance (docs: shared guided-decoding research): a dependency-free abi3 wheel; it builds its
tokenizer straight from our tiktoken ranks with Kimi's 256 specials as *real* special tokens, so
text (free text, JSON strings, regexes) can never produce a tool marker and a grammar names markers
by token; per-request compiles take milliseconds (no precompiled tool lists needed); unsupported
schema keywords are loud errors rather than silently ignored.

One :class:`LLGuidanceBackend` per process: building the token trie takes ~0.5 s at 163,840 ids.
Compiled grammars are kept in an LRU keyed by grammar text, each as a prototype matcher that
sequences copy.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import llguidance
import numpy as np

from kimi_grpc.guided.backend import GrammarError, mask_words
from kimi_grpc.tokenizer import KimiTokenizer

GRAMMAR_CACHE_SIZE = 256
SCHEMA_CACHE_SIZE = 1024
_QUIET = 0  # llguidance log level: errors reach us through is_error()/get_error()


class LLGuidanceMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def consume(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def error(self) -> str:
        return self._m.get_error()

    @property
    def native(self) -> llguidance.LLMatcher:
        return self._m


class LLGuidanceGrammar:
    __slots__ = ("_prototype",)

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._prototype.deep_copy())


class LLGuidanceBackend:
    def __init__(
        self,
        tokenizer: KimiTokenizer,
        *,
        eos_token_ids: list[int],
        vocab_size: int,
        num_threads: int | None = None,
    ) -> None:
        """``vocab_size``: the model's logits width (>= the tokenizer's; ids beyond the tokenizer
        are never allowed). ``eos_token_ids``: the ids the grammar allows once it accepts.
        ``num_threads``: mask-filling threads (default: 3/4 of the cores, at least 1)."""
        enc = tokenizer.encoding
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer.from_tiktoken(
            encoder=enc._mergeable_ranks,
            special_tokens=enc._special_tokens,
            pattern=enc._pat_str,
            eos_token=list(eos_token_ids),
            n_vocab=vocab_size,
        )
        threads = num_threads or max(1, (os.cpu_count() or 1) * 3 // 4)
        self._executor = llguidance.LLExecutor(threads)
        # LRUs (thread-safe; a failed compile raises and is not cached).
        self.compile = functools.lru_cache(GRAMMAR_CACHE_SIZE)(self._compile)
        self._schema_problems = functools.lru_cache(SCHEMA_CACHE_SIZE)(_schema_problems)
        self.words = mask_words(vocab_size)

    def _compile(self, grammar: str) -> LLGuidanceGrammar:
        matcher = llguidance.LLMatcher(
            self.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=_QUIET
        )
        if matcher.is_error():
            raise GrammarError("grammar", matcher.get_error())
        return LLGuidanceGrammar(matcher)

    def json_schema_problems(self, schema: dict[str, Any], *, lenient: bool) -> list[str]:
        return list(self._schema_problems(json.dumps(schema, sort_keys=True), lenient))

    def fill_masks(self, rows: list[tuple[LLGuidanceMatcher, int]], bitmask: np.ndarray) -> None:
        assert bitmask.dtype == np.int32 and bitmask.flags.c_contiguous, bitmask
        assert bitmask.ndim == 2 and bitmask.shape[1] == self.words, bitmask.shape
        if rows:
            self._executor.unsafe_compute_mask_ptr(
                [(m.native, row) for m, row in rows],
                bitmask.ctypes.data,
                self.words * 4,
                bitmask.shape[0],
            )


def _schema_problems(schema_json: str, lenient: bool) -> tuple[str, ...]:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema_json, overrides={"lenient": True} if lenient else None
        )
    except ValueError as exc:  # e.g. "recursion limit exceeded" for a deeply nested schema
        return (str(exc),)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return tuple(messages) if is_error else ()  # (lenient: warnings name what it ignored)
