"""Token-mode parsing: markers are special token ids, never text that merely spells one.

An output is tokenized with the demo tokenizer, streamed as a simulated engine would stream it
(IncrementalDetokenizer + StopChecker, one delta per token, deltas then grouped), cut at special
tokens by SpecialTokenText and parsed by StreamParser(markers_as_tokens=True):

* every corpus case of tests/test_parsers.py whose marker spellings are all special tokens parses
  exactly as in text mode, for every grouping of the engine deltas and any split of the text;
* marker spellings produced as ordinary tokens (a tool argument quoting ``<|tool_call_end|>``) are
  kept as text in token mode, where text mode splits the call: the reason the mode exists;
* SpecialTokenText returns exactly the engine text (held back, cut at stops, multi-byte characters
  across tokens, skipped specials), special pieces only for special ids, and remainder() returns
  exactly the rest of the full decode.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_grpc.engine.stop_checker import StopChecker
from kimi_grpc.parsers import MARKERS, ParsedOutput, StreamDelta, StreamParser, parse_output
from kimi_grpc.special_text import SpecialTokenText
from kimi_grpc.tokenizer import IncrementalDetokenizer, KimiTokenizer, demo_tokenizer_dir
from tests.test_parsers import AB, CB, CE, CORPUS, SB, SE, TB, TE, Case, check_deltas, out

TOK = KimiTokenizer.from_dir(demo_tokenizer_dir())
IM_END = TOK.im_end_id
RESERVED = "<|reserved_token_1797|>"  # an unnamed slot of the demo vocabulary
Delta = tuple[list[int], str]  # what the engine streams: new token ids, new text
Piece = tuple[str, bool]


def special(text: str) -> list[int]:
    return TOK.encode(text, allow_special=True)


def engine(
    ids: list[int],
    *,
    skip: bool,
    stop: tuple[str, ...] = (),
    include: bool = False,
    stop_ids: frozenset[int] = frozenset(),
) -> list[Delta]:
    """One delta per token, as LLMEngine._advance makes them; ends at a stop (or the last id)."""
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    checker = StopChecker(list(stop), include)
    deltas: list[Delta] = []
    for i, tid in enumerate(ids):
        by_string = False
        if tid in stop_ids:  # a stop token is not detokenized
            text, done = "", True
        else:
            update = checker.push(detok.push(tid))
            text, done = update.text, update.stopped
            by_string = done
        if not by_string and (done or i == len(ids) - 1):
            text += checker.push(detok.flush()).text
            text += checker.flush()
        deltas.append(([tid], text))
        if done:
            break
    return deltas


def group(deltas: list[Delta], cuts: tuple[int, ...]) -> list[Delta]:
    """Merge consecutive deltas (``cuts``: delta indices where a new group starts)."""
    bounds = (0, *cuts, len(deltas))
    return [
        ([t for ids, _ in deltas[a:b] for t in ids], "".join(text for _, text in deltas[a:b]))
        for a, b in itertools.pairwise(bounds)
    ]


def split(chunks: list[Delta], *, skip: bool) -> tuple[list[list[Piece]], list[Piece]]:
    """SpecialTokenText's pieces per pushed chunk, and those of finish()."""
    splitter = SpecialTokenText(TOK, skip_special_tokens=skip)
    pushed = [splitter.push(ids, text) for ids, text in chunks]
    return pushed, splitter.finish()


def parse_tokens(
    chunks: list[Delta], kwargs: dict, *, skip: bool, cuts: frozenset[int] | bool = frozenset()
) -> tuple[ParsedOutput, list[StreamDelta]]:
    """Split and parse in token mode. Ordinary text is further cut at the offsets ``cuts`` of the
    engine text (``True``: between every two characters)."""
    parser = StreamParser(**kwargs, markers_as_tokens=True)
    deltas, pos = [], 0
    pushed, last = split(chunks, skip=skip)
    for text, is_special in itertools.chain(*pushed, last):
        if is_special:
            deltas.append(parser.feed_marker(text))
        else:
            if cuts is True:
                bounds = range(len(text) + 1)
            else:
                inner = (c - pos for c in sorted(cuts) if pos < c < pos + len(text))
                bounds = [0, *inner, len(text)]
            deltas += [parser.feed_text(text[a:b]) for a, b in itertools.pairwise(bounds)]
        pos += len(text)
    deltas.append(parser.finish())
    return parser.result, deltas


# -- token mode == text mode on the corpus ----------------------------------------------------


def ordinary_text(ids: list[int]) -> str:
    return TOK.decode([t for t in ids if not TOK.is_special(t)])


def corpus_ids(case: Case) -> list[int]:
    ids = special(case.text)
    assert TOK.decode(ids) == case.text
    return ids


# Cases where a marker spelling occurs in ordinary text: "<th<think>ink>" forms one by removal;
# the singular "<|tool_call_section_begin|>" spelling is no token of the vocabulary.
TEXT_MARKERS = {"markers_formed_by_removal_also_removed", "singular_section_markers"}
TOKEN_CORPUS = [c for c in CORPUS if c.name not in TEXT_MARKERS]


def test_token_corpus_is_the_corpus_without_ordinary_marker_text() -> None:
    has_marker = {c.name for c in CORPUS if any(m in ordinary_text(corpus_ids(c)) for m in MARKERS)}
    assert has_marker == TEXT_MARKERS
    assert len(TOKEN_CORPUS) >= 30


def expected_tokens(case: Case, ids: list[int], skip: bool) -> ParsedOutput:
    """Text mode on the text the engine streams: the case's text, or its decode without the
    skipped specials (gone from arguments too)."""
    if not skip:
        return case.expected
    return parse_output(TOK.decode(ids, skip_special_tokens=True), **case.kwargs())


@pytest.mark.parametrize("skip", [False, True], ids=["keep_specials", "skip_specials"])
@pytest.mark.parametrize("case", TOKEN_CORPUS, ids=lambda c: c.name)
def test_token_mode_equals_text_mode_at_every_split(case: Case, skip: bool) -> None:
    ids = corpus_ids(case)
    expected = expected_tokens(case, ids, skip)
    deltas = engine(ids, skip=skip)
    step = 1 if len(deltas) < 5000 else len(deltas) // 7  # the 100 KB case: a sample
    for cut in range(0, len(deltas) + 1, step):
        result, stream = parse_tokens(group(deltas, (cut,)), case.kwargs(), skip=skip)
        assert result == expected, (case.name, cut)
        check_deltas(stream, result)
    if len(deltas) < 5000:
        result, stream = parse_tokens(deltas, case.kwargs(), skip=skip, cuts=True)
        assert result == expected
        check_deltas(stream, result)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([c for c in TOKEN_CORPUS if len(c.text) < 5000]), st.booleans(), st.data())
def test_token_mode_random_splits(case: Case, skip: bool, data: st.DataObject) -> None:
    ids = corpus_ids(case)
    deltas = engine(ids, skip=skip)
    groups = data.draw(st.lists(st.integers(0, len(deltas)), max_size=10).map(sorted))
    text_cuts = data.draw(st.frozensets(st.integers(0, len(case.text)), max_size=12))
    chunks = group(deltas, tuple(groups))
    result, stream = parse_tokens(chunks, case.kwargs(), skip=skip, cuts=text_cuts)
    assert result == expected_tokens(case, ids, skip)
    check_deltas(stream, result)


# -- marker spellings as ordinary tokens ------------------------------------------------------

ARGS = '{"path": "a.txt", "content": "x <|tool_call_end|> y"}'
COLLISION = [*special(f"{SB}{CB}functions.write:0{AB}"), *TOK.encode(ARGS), *special(f"{CE}{SE}")]


def test_marker_text_in_arguments_stays_in_the_call() -> None:
    assert TOK.decode(COLLISION).count(CE) == 2 and special(CE)[0] in COLLISION
    deltas = engine(COLLISION, skip=True)
    for cut in range(len(deltas) + 1):
        result, stream = parse_tokens(group(deltas, (cut,)), {"thinking": False}, skip=True)
        assert result == out(calls=[("functions.write:0", "write", ARGS)])
        check_deltas(stream, result)
    result, stream = parse_tokens(deltas, {"thinking": False}, skip=True, cuts=True)
    assert result == out(calls=[("functions.write:0", "write", ARGS)])


def test_text_mode_splits_that_call() -> None:
    """Why token mode exists: on the decoded text the quoted marker ends the call."""
    result = parse_output(TOK.decode(COLLISION), thinking=False)
    assert result.tool_calls[0].arguments == '{"path": "a.txt", "content": "x'
    assert "tool call functions.write:0: arguments are not valid JSON" in result.errors


def test_marker_text_in_reasoning_and_content_is_kept_verbatim() -> None:
    reasoning = f"The file says {TE} and {SB} here"
    content = f"It contains {CB}, [EOS] and <|im_end|>, {TB} too"
    ids = [*TOK.encode(reasoning), *special(TE), *TOK.encode(content), IM_END]
    for skip in (False, True):
        result, stream = parse_tokens(engine(ids, skip=skip), {"thinking": True}, skip=skip)
        assert result == out(reasoning, content)
        check_deltas(stream, result)
    assert parse_output(TOK.decode(ids), thinking=True) != out(reasoning, content)


def test_special_tokens_that_are_no_structure() -> None:
    """Unknown specials are dropped from content; inside a call, non-tool specials are kept as
    argument text (as text mode keeps their spelling); a <think> after content is dropped."""
    ids = [
        *special(f"a{RESERVED}b{SB}{CB}functions.f:0{AB}"),
        *special(f'{{"x": "{TB}{RESERVED}"}}{CE}{SE}c{TB}d'),
    ]
    result, _ = parse_tokens(engine(ids, skip=False), {"thinking": False}, skip=False)
    call = ("functions.f:0", "f", f'{{"x": "{TB}{RESERVED}"}}')
    assert result == out(content="abcd", calls=[call])


def test_feed_methods_belong_to_one_mode() -> None:
    tokens, text = (
        StreamParser(thinking=False, markers_as_tokens=True),
        StreamParser(thinking=False),
    )
    with pytest.raises(RuntimeError, match="token mode"):
        tokens.feed("x")
    with pytest.raises(RuntimeError, match="text mode"):
        text.feed_text("x")
    with pytest.raises(RuntimeError, match="text mode"):
        text.feed_marker(CE)
    assert tokens.feed_text("x") == StreamDelta(content="x")
    tokens.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        tokens.feed_marker(CE)


# -- SpecialTokenText ----------------------------------------------------------------------------


def reference_spans(ids: list[int], skip: bool) -> list[tuple[int, int]]:
    """[start, end) in the full decode of each special token that is not skipped."""
    spans = []
    for k, tid in enumerate(ids):
        if TOK.is_special(tid) and not (skip and tid in TOK.skipped_special_ids):
            end = len(TOK.decode(ids[: k + 1], skip_special_tokens=skip))
            spans.append((end - len(TOK.token_bytes(tid)), end))
    return spans


def reference_pieces(text: str, spans: list[tuple[int, int]]) -> list[Piece]:
    """``text`` split at the spans it covers wholly (normalized: see :func:`merged`)."""
    pieces, pos = [], 0
    for start, end in spans:
        if end <= len(text):
            pieces += [(text[pos:start], False), (text[start:end], True)]
            pos = end
    return merged([*pieces, (text[pos:], False)])


def merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent ordinary pieces joined, empty ones dropped (the same split, however chunked)."""
    out: list[Piece] = []
    for text, is_special in pieces:
        if out and not is_special and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        elif text:
            out.append((text, is_special))
    return out


def check_split(chunks: list[Delta], *, skip: bool) -> tuple[list[list[Piece]], list[Piece]]:
    ids = [t for chunk, _ in chunks for t in chunk]
    engine_text = "".join(text for _, text in chunks)
    spans = reference_spans(ids, skip)
    pushed, last = split(chunks, skip=skip)
    sent = engine_so_far = ""
    for (_, text), pieces in zip(chunks, pushed, strict=True):
        assert all(piece for piece, _ in pieces)
        sent += "".join(piece for piece, _ in pieces)
        engine_so_far += text
        assert engine_so_far.startswith(sent)
        if len(sent) < len(engine_so_far):  # only the start of a special token's text is held
            assert any(a == len(sent) and b > len(engine_so_far) for a, b in spans)
    got = [*itertools.chain(*pushed), *last]
    assert "".join(text for text, _ in got) == engine_text
    assert merged(got) == reference_pieces(engine_text, spans)
    return pushed, last


def check_remainder(chunks: list[Delta], *, skip: bool) -> None:
    ids = [t for chunk, _ in chunks for t in chunk]
    full = TOK.decode(ids, skip_special_tokens=skip)
    splitter = SpecialTokenText(TOK, skip_special_tokens=skip)
    got = [piece for ids, text in chunks for piece in splitter.push(ids, text)]
    expected = reference_pieces(full, reference_spans(ids, skip))
    assert merged([*got, *splitter.remainder()]) == expected


BYTES = {b: TOK.encoding.encode_single_token(bytes([b])) for b in (0x96, 0xE4, 0xF0)}
FRAGMENT = st.one_of(
    st.text("ab <|>/_世é😀\n", max_size=6).map(TOK.encode),
    st.sampled_from([*MARKERS, RESERVED, "[EOS]", "<|im_end|>"]).map(special),
    st.sampled_from(MARKERS).map(TOK.encode),  # a marker's spelling as ordinary tokens
    st.sampled_from(sorted(BYTES.values())).map(lambda t: [t]),  # invalid UTF-8
)


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENT, max_size=12).map(lambda f: [t for ids in f for t in ids]), st.data())
def test_splitter_pieces_are_the_engine_text(ids: list[int], data: st.DataObject) -> None:
    skip, include = data.draw(st.booleans()), data.draw(st.booleans())
    full = TOK.decode(ids, skip_special_tokens=skip)
    stop: tuple[str, ...] = ()
    if full and data.draw(st.booleans()):  # stop strings likely to match, also inside specials
        a = data.draw(st.integers(0, len(full) - 1))
        b = data.draw(st.integers(a + 1, min(len(full), a + 4)))
        stop = (full[a:b], *data.draw(st.lists(st.sampled_from([">>>", "|>x", "_end|", "]"]))))
    stop_ids = data.draw(st.sampled_from([frozenset(), frozenset({IM_END})]))
    deltas = engine(ids, skip=skip, stop=stop, include=include, stop_ids=stop_ids)
    cuts = data.draw(st.lists(st.integers(0, len(deltas)), max_size=8).map(sorted))
    chunks = group(deltas, tuple(cuts))
    check_split(chunks, skip=skip)
    abandon = data.draw(st.integers(0, len(chunks)))
    check_remainder(chunks[:abandon], skip=skip)


def test_held_back_stop_prefix_inside_a_marker() -> None:
    """Stop ">>>" holds back the ">" that ends every marker: the engine text ends inside it, and
    the marker comes out whole with the next text."""
    ids = [*TOK.encode("a"), *special(CE), *TOK.encode("b")]
    deltas = engine(ids, skip=True, stop=(">>>",))
    assert [text for _, text in deltas] == ["a", CE[:-1], ">b"]
    pushed, last = check_split(deltas, skip=True)
    assert pushed == [[("a", False)], [], [(CE, True), ("b", False)]] and last == []


@pytest.mark.parametrize(
    ("stop", "include", "text"),
    [("<|tool", True, "a<|tool"), ("_end|", False, "a<|tool_call"), ("end|>", True, f"a{CE}")],
)
def test_stop_inside_a_marker(stop: str, include: bool, text: str) -> None:
    """A stop string that matches inside a marker cuts it: the cut head is ordinary text."""
    deltas = engine(
        [*TOK.encode("a"), *special(CE), *TOK.encode("b")], skip=True, stop=(stop,), include=include
    )
    assert "".join(t for _, t in deltas) == text
    pushed, last = check_split(deltas, skip=True)
    if text.endswith(CE):
        assert pushed[-1][-1] == (CE, True) and last == []
    else:
        assert last == [(text[1:], False)]


@pytest.mark.parametrize("skip", [False, True])
def test_utf8_split_across_tokens_and_specials(skip: bool) -> None:
    """ "世" is two tokens of the demo vocabulary; a special between them ends the character
    (U+FFFD) unless it is skipped; a trailing incomplete character flushes as U+FFFD."""
    first, second = TOK.encode("世")
    ids = [first, IM_END, second, *special(CE), first]
    full = TOK.decode(ids, skip_special_tokens=skip)
    assert full == (f"世{CE}\ufffd" if skip else f"\ufffd<|im_end|>\ufffd{CE}\ufffd")
    deltas = engine(ids, skip=skip)
    assert "".join(t for _, t in deltas) == full  # the engine flushes at the end
    for cut in range(len(deltas) + 1):
        check_split(group(deltas, (cut,)), skip=skip)
        check_remainder(group(deltas, (cut,))[:1], skip=skip)
    splitter = SpecialTokenText(TOK, skip_special_tokens=skip)
    assert splitter.push(ids, "") == []
    assert splitter.remainder()[-2:] == [(CE, True), ("\ufffd", False)]  # the decoder's flush


@pytest.mark.parametrize(
    ("text", "stop", "sent", "rest"),
    [
        (f"x{CE}EN!", "END", [("x", False), (CE, True)], [("EN", False)]),
        (f"a{CE}b", ">>>", [("a", False)], [(CE, True)]),  # held inside the marker: whole
    ],
)
def test_remainder_is_what_the_engine_held_back(text, stop, sent, rest) -> None:
    """Abandoned before its last delta, the engine still holds a possible stop's start."""
    deltas = engine(special(text), skip=True, stop=(stop,))[:-1]
    splitter = SpecialTokenText(TOK, skip_special_tokens=True)
    got = [piece for ids, text in deltas for piece in splitter.push(ids, text)]
    assert merged(got) == sent
    assert splitter.remainder() == rest
    with pytest.raises(RuntimeError, match="after finish"):
        splitter.push([], "")


def test_engine_text_must_continue_the_decode() -> None:
    splitter = SpecialTokenText(TOK, skip_special_tokens=True)
    assert splitter.push(TOK.encode("ab"), "a") == [("a", False)]
    with pytest.raises(ValueError, match="does not continue"):
        splitter.push([], "x")
