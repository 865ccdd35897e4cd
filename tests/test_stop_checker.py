"""StopChecker: stop strings across token boundaries, hold-back, include/exclude, flush."""

from __future__ import annotations

import itertools
import random

import pytest

from kimi_grpc.engine.stop_checker import StopChecker, StopUpdate


def stream(checker: StopChecker, deltas: list[str]) -> tuple[list[str], StopUpdate | None]:
    """Pushes deltas until a stop; returns what was emitted per push (+ flush) and the stop."""
    emitted = []
    for delta in deltas:
        update = checker.push(delta)
        emitted.append(update.text)
        if update.stopped:
            return emitted, update
    emitted.append(checker.flush())
    return emitted, None


def test_no_stops_passes_deltas_through_unchanged():
    checker = StopChecker([], include_stop_str_in_output=False)
    for delta in ["E", "N", "D", "", "héllo 世界"]:
        assert checker.push(delta) == StopUpdate(delta, False, None)
    assert checker.flush() == ""


def test_match_across_token_boundaries():
    checker = StopChecker(["END"], include_stop_str_in_output=False)
    assert checker.push("abc E") == StopUpdate("abc ", False, None)
    assert checker.push("N") == StopUpdate("", False, None)
    update = checker.push("D tail")
    assert update == StopUpdate("", True, "END")
    assert checker.flush() == ""
    assert checker.push("more") == StopUpdate("", True, "END")  # after the stop: nothing


def test_include_stop_str_in_output():
    emitted, update = stream(StopChecker(["END"], True), ["abc E", "N", "D tail"])
    assert update.stopped and update.stop_str == "END"
    assert "".join(emitted) == "abc END"
    emitted, update = stream(StopChecker(["END"], False), ["abc E", "N", "D tail"])
    assert "".join(emitted) == "abc "


def test_false_alarm_is_released():
    checker = StopChecker(["END"], include_stop_str_in_output=False)
    assert checker.push("xE").text == "x"
    assert checker.push("N").text == ""
    assert checker.push("O").text == "ENO"  # no longer a stop prefix
    assert checker.push("EE").text == "E"  # "E" could still start "END"
    assert checker.flush() == "E"
    assert checker.flush() == ""


def test_holds_back_only_the_longest_stop_prefix():
    checker = StopChecker(["abcd", "xyz"], include_stop_str_in_output=False)
    assert checker.push("hello ab").text == "hello "
    assert checker.push("c").text == ""
    assert checker.push("x").text == "abc"  # "abcx" is no prefix; "x" might start "xyz"
    assert checker.push("y").text == ""
    update = checker.push("z!")
    assert update == StopUpdate("", True, "xyz")


def test_overlapping_self_prefix():
    # "abab" inside "ababab": the first complete match ends at index 4.
    emitted, update = stream(StopChecker(["abab"], False), list("xababab"))
    assert update.stop_str == "abab" and "".join(emitted) == "x"
    emitted, update = stream(StopChecker(["aab"], False), list("aaaab"))
    assert update.stop_str == "aab" and "".join(emitted) == "aa"


def test_multiple_stops_first_to_end_wins():
    # Both in one delta: "b" ends first although "abc" starts first.
    assert StopChecker(["abc", "b"], False).push("xabc") == StopUpdate("xa", True, "b")
    # Same end: the longer (earlier-starting) wins.
    assert StopChecker(["c", "bc"], False).push("abcd") == StopUpdate("a", True, "bc")
    assert StopChecker(["c", "bc"], True).push("abcd") == StopUpdate("abc", True, "bc")
    # Different ends: the earlier one, regardless of list order.
    assert StopChecker(["zz", "yy"], False).push("_yy_zz") == StopUpdate("_", True, "yy")


def test_result_is_independent_of_chunking():
    text = "the quick END brown <|x|> fox ENDING"
    for stops, include in itertools.product(
        (["END"], ["<|x|>", "brown"], ["fox", "ick", "k E"], ["ENDING", "zzz"]), (False, True)
    ):
        whole, whole_update = stream(StopChecker(stops, include), [text])
        rng = random.Random(0)
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            got, update = stream(StopChecker(stops, include), pieces)
            assert "".join(got) == "".join(whole), (stops, include, pieces)
            assert (update and update.stop_str) == (whole_update and whole_update.stop_str)


@pytest.mark.parametrize("include", [False, True])
def test_hold_back_never_leaks_a_stop_prefix(include):
    """Streamed char by char, near-misses ("S", "STO", "<e", "<eo") are held then released;
    the output ends exactly at the stop (or after it with include)."""
    stops = ["STOP", "ST", "<eot>"]
    text = "aS bST cSTO d<e <eo <eot> tail"
    checker = StopChecker(stops, include)
    sent = ""
    for ch in text:
        update = checker.push(ch)
        sent += update.text
        if update.stopped:
            break
    # "ST" ends first (at "bST").
    assert update.stopped and update.stop_str == "ST"
    assert sent == ("aS bST" if include else "aS b")


def test_never_leaks_the_start_of_a_later_match():
    checker = StopChecker(["</answer>"], include_stop_str_in_output=False)
    emitted = []
    for delta in ["The answer is 42", "</", "ans", "wer", ">", " junk"]:
        update = checker.push(delta)
        emitted.append(update.text)
        assert "<" not in update.text
        if update.stopped:
            break
    assert emitted == ["The answer is 42", "", "", "", ""]


def test_unicode_stop_strings():
    emitted, update = stream(StopChecker(["。结束"], False), ["你好", "世界。", "结", "束吧"])
    assert update.stop_str == "。结束" and "".join(emitted) == "你好世界"
    assert emitted[1] == "世界"  # "。" held back as a possible start
    emitted, update = stream(StopChecker(["🛑"], True), ["go 🚀", " now🛑", "later"])
    assert "".join(emitted) == "go 🚀 now🛑" and update.stop_str == "🛑"
    emitted, update = stream(StopChecker(["👋🏽bye"], False), ["hi 👋🏽", "b", "ok"])
    assert update is None and "".join(emitted) == "hi 👋🏽bok"
    assert emitted[:2] == ["hi ", ""]


def test_flush_releases_held_text_at_end_of_stream():
    checker = StopChecker(["<|im_end|>"], include_stop_str_in_output=False)
    assert checker.push("done <|im").text == "done "
    assert checker.flush() == "<|im"
    emitted, update = stream(StopChecker(["xyz"], False), ["ax", "y"])
    assert update is None and emitted == ["a", "", "xy"]


def test_empty_delta_and_empty_stop_rejected():
    checker = StopChecker(["ab"], include_stop_str_in_output=False)
    assert checker.push("") == StopUpdate("", False, None)
    assert checker.push("a").text == ""
    assert checker.push("").text == ""
    assert checker.push("b") == StopUpdate("", True, "ab")
    with pytest.raises(ValueError):
        StopChecker([""], include_stop_str_in_output=False)


def reference_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Brute force: scanning end positions in order, the first at which a stop completes
    (the longest stop on a tie); returns (end, stop)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end, max(done, key=len)
    return None


def longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    return max(
        (k for k in range(1, len(text) + 1) for s in stops if s.startswith(text[len(text) - k :])),
        default=0,
    )


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_against_brute_force(include):
    rng = random.Random(42 + include)
    for _ in range(400):
        stops = ["".join(rng.choices("ab€", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("ab€c", k=rng.randint(0, 20)))
        cuts = sorted(
            rng.sample(range(1, len(text)), max(0, min(len(text) - 1, rng.randint(0, 6))))
        )
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        checker = StopChecker(stops, include)
        sent = received = ""
        update = None
        for piece in pieces:
            update = checker.push(piece)
            sent += update.text
            received += piece
            if update.stopped:
                break
            if not include:  # exactly the longest possible stop start is held back
                held = longest_stop_prefix_suffix(received, stops)
                assert sent == received[: len(received) - held], (stops, pieces)
            else:
                assert sent == received
        expected = reference_stop(text, stops)
        if expected is None:
            assert not (update and update.stopped)
            assert sent + checker.flush() == text, (stops, pieces)
        else:
            end, stop = expected
            assert update.stopped and update.stop_str == stop, (stops, pieces)
            assert sent == text[: end if include else end - len(stop)], (stops, pieces)
            assert checker.flush() == ""
