"""Stop strings over streamed, detokenized text.

Stop strings match the text, not tokens, so a stop may straddle token boundaries ("END" arriving
as "E" then "ND"). Until a match, the checker holds back the longest suffix of the unsent text
that could still begin a stop string, so a streaming client never sees the start of a stop string
that later matches; everything before that suffix is safe to emit at once.

Which stop wins: the match that *ends* first (it is the one a character-by-character reader would
see complete first), and among matches ending at the same character the longer one (it starts
earlier). This makes the result independent of how the text is split into deltas. Example: stops
``["abc", "b"]`` on ``"abc"`` stop at ``"b"`` (emitting ``"a"``), whatever the chunking.

With ``include_stop_str_in_output`` there is no hold-back (as in vLLM): the client will see the
stop string anyway, and everything sent before a match precedes the match's end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopUpdate:
    text: str  # text that is now safe to emit to the client
    stopped: bool  # a stop string matched: finish with finish_reason "stop"
    stop_str: str | None  # the stop string that matched


class StopChecker:
    """Per-completion; feed it every text delta in order with :meth:`push`, and call
    :meth:`flush` when the completion ends for another reason (eos, length)."""

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._first_chars = frozenset(s[0] for s in self.stop)
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._hold = bool(self.stop) and not include_stop_str_in_output
        self._window = ""  # the tail of the text received so far, for matches across deltas
        self._unsent = 0  # how many of its last characters are held back
        self.stopped = False
        self.stop_str: str | None = None

    def push(self, text_delta: str) -> StopUpdate:
        """``text_delta``: newly detokenized text. Returns what may be emitted now. After a match,
        further pushes return empty text (still ``stopped``)."""
        if self.stopped:
            return StopUpdate("", True, self.stop_str)
        if not self.stop:
            return StopUpdate(text_delta, False, None)
        # _window: the last (longest stop - 1) characters received, the last _unsent of them not
        # yet emitted. No match lies wholly within it (it would have been found), so any match
        # ends in the new text; the one ending first wins, the longer one on a tie.
        text = self._window + text_delta
        sent_end = len(self._window) - self._unsent  # text[:sent_end] was emitted already
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self.stop:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            end, _, stop = best
            self.stopped, self.stop_str = True, stop
            self._window, self._unsent = "", 0
            if not self.include_stop_str_in_output:
                end -= len(stop)
                assert end >= sent_end, "held-back text must cover a stop string's start"
            return StopUpdate(text[sent_end:end], True, stop)
        held = min(self._held_suffix(text), len(text) - sent_end) if self._hold else 0
        keep = self._max_len - 1
        self._window = text[max(0, len(text) - keep) :] if keep else ""
        self._unsent = held
        return StopUpdate(text[sent_end : len(text) - held], False, None)

    def pass_through(self, text_delta: str) -> StopUpdate:
        """Like :meth:`push` for text that must not be matched (inside a tool call or JSON value
        under guided decoding): emits the held-back text and ``text_delta``; matching resumes on
        later pushes, from after this text."""
        if self.stopped:
            return StopUpdate("", True, self.stop_str)
        text = self.flush() + text_delta
        self._window = ""
        return StopUpdate(text, False, None)

    def flush(self) -> str:
        """End of stream without a stop match: the held-back text (empty after a match)."""
        text = self._window[len(self._window) - self._unsent :] if self._unsent else ""
        self._unsent = 0
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for start in range(max(0, len(text) - self._max_len + 1), len(text)):
            if text[start] in self._first_chars:
                tail = text[start:]
                if any(s.startswith(tail) for s in self.stop):
                    return len(text) - start
        return 0
