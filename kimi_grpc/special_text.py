"""Split an engine request's streamed text at the special tokens' text, for token-mode parsing.

The engine streams deltas ``(token_ids, text)``: ``text`` is its own incremental decode of the
tokens (skipping ``skipped_special_ids`` when ``skip_special_tokens``), after stop-string handling
that may hold back a suffix (a possible stop-string prefix, an incomplete UTF-8 character) and, at
a stop, cut the text. So the engine's cumulative text is always a prefix of ``D``, the full decode
``tokenizer.decode(all ids, skip_special_tokens=...)``. :class:`SpecialTokenText` decodes the same
tokens itself, remembers where each special token's text lies in ``D``, and cuts the engine text
into ``(text, is_special)`` pieces for ``StreamParser(markers_as_tokens=True)``
(:meth:`~kimi_grpc.parsers.StreamParser.feed_marker` / ``feed_text``).

A special token's text comes out as one piece once the engine text covers all of it. The engine
text can end inside it: mid-stream when a stop string's prefix is held back (stop ``">>>"`` holds
the ``">"`` that ends every marker), at the end when a stop string matches inside it. The piece is
then held back here until the engine text covers the rest; :meth:`SpecialTokenText.finish` (the
request ended there) returns it as ordinary text, :meth:`SpecialTokenText.remainder` (the request
is abandoned) returns it whole, as a special piece.
"""

from __future__ import annotations

from collections import deque

from kimi_grpc.tokenizer import IncrementalDetokenizer, KimiTokenizer

__all__ = ["SpecialTokenText"]

Piece = tuple[str, bool]  # (text, is_special)


class SpecialTokenText:
    """Pieces of one engine request's output text, split at special tokens' text.

    Invariants (``D`` as in the module docstring, ``E`` the engine text pushed so far):
    the pieces returned by :meth:`push` concatenate to a prefix of ``E`` that falls short of it
    only by the start of a special token's text that ``E`` ends inside; adding :meth:`finish`
    gives exactly ``E``, adding :meth:`remainder` instead gives exactly ``D``. A piece is special
    iff it is the whole text of one special token that is not skipped.
    """

    def __init__(self, tokenizer: KimiTokenizer, *, skip_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._names = {i: name for name, i in tokenizer.special_tokens.items()}
        self._start = 0  # D[:_start] was returned as pieces
        self._unsent = ""  # D[_start:], what has been decoded but not returned
        self._engine_end = 0  # len(E)
        self._spans: deque[tuple[int, int]] = deque()  # [start, end) in D of specials not sent
        self._done = False

    def push(self, token_ids: list[int], engine_text: str) -> list[Piece]:
        """One engine delta: its new tokens and its new text. Returns the pieces of the text
        (held back: the start of a special token's text it ends inside). Raises ValueError when
        the engine text does not continue the decode of the tokens."""
        self._check_open("push")
        decoded = [self._unsent]
        end = self._start + len(self._unsent)  # len(D) so far
        for tid in token_ids:
            text = self._detok.push(tid)
            end += len(text)
            decoded.append(text)
            if self._tok.is_special(tid) and tid not in self._skip:
                name = self._names[tid]  # ASCII in practice, always valid UTF-8: it ends the text
                assert text.endswith(name), (text, name)
                self._spans.append((end - len(name), end))
        engine_end = self._engine_end + len(engine_text)
        if engine_end > end:  # the engine flushed its decoder (end of stream): so do we
            text = self._detok.flush()
            end += len(text)
            decoded.append(text)
        self._unsent = "".join(decoded)
        at = self._engine_end - self._start
        if not self._unsent.startswith(engine_text, at):
            got = self._unsent[at : at + len(engine_text)]
            raise ValueError(f"engine text {engine_text!r} does not continue the decode ({got!r})")
        self._engine_end = engine_end
        return self._take(engine_end)

    def finish(self) -> list[Piece]:
        """The engine request ended: the engine text held back (the start of a special token's
        text that a stop cut) as one ordinary piece, or nothing."""
        self._check_open("finish")
        self._done = True
        held = self._unsent[: self._engine_end - self._start]
        self._unsent, self._start = "", self._engine_end
        self._spans.clear()
        return [(held, False)] if held else []

    def remainder(self) -> list[Piece]:
        """The request is abandoned: the pieces of the rest of ``D`` (decoder flush included),
        from what :meth:`push` held back on."""
        self._check_open("remainder")
        self._done = True
        self._unsent += self._detok.flush()
        return self._take(self._start + len(self._unsent))

    def _check_open(self, method: str) -> None:
        if self._done:
            raise RuntimeError(f"SpecialTokenText.{method}() after finish() or remainder()")

    def _take(self, end: int) -> list[Piece]:
        """Return ``D[_start:end]`` as pieces, stopping short at a special token's text that
        straddles ``end``."""
        pieces: list[Piece] = []
        spans, unsent, base = self._spans, self._unsent, self._start
        pos = base
        while spans and spans[0][0] < end:
            start, stop = spans[0]
            if stop > end:
                end = start
                break
            if start > pos:
                pieces.append((unsent[pos - base : start - base], False))
            pieces.append((unsent[start - base : stop - base], True))
            pos = stop
            spans.popleft()
        if end > pos:
            pieces.append((unsent[pos - base : end - base], False))
        self._unsent, self._start = unsent[end - base :], end
        return pieces
