from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mimoserve.parsing.stop import StopMatcher
from tests.parsing.splits import every_split


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(piece) for piece in pieces) + matcher.finish()
    return out, matcher.stopped


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    # The stop that completes first wins; for equal ends, the one that started earlier.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(hits)[1]], True) if hits else (text, False)


CASES = [
    ("Hello world. END here", ["END"]),
    ("abcabcabd", ["abd"]),
    ("no stop in this text", ["xyz", "qq"]),
    ("aaab", ["aab"]),
    ("the end</s>trailing", ["</s>", "end<"]),
    ("overlap: ababc", ["abc", "bab"]),
    ("><<", ["<", "><<"]),
    ("你好世界。再见", ["世界"]),
    ("stop at the very end##", ["##"]),
    ("partial tail #", ["##"]),
]


@pytest.mark.parametrize(("text", "stops"), CASES)
def test_every_split_gives_the_same_result_as_the_whole_text(text: str, stops: list[str]) -> None:
    expected = reference(text, stops)
    assert run([text], stops) == expected
    for pieces in every_split(text):
        assert run(pieces, stops) == expected, pieces


def test_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hello ST") == "hello "
    assert matcher.feed("x") == "STx"
    assert matcher.feed("STO") == ""
    assert matcher.feed("P more") == ""
    assert matcher.stopped
    assert matcher.finish() == ""


def test_unfinished_prefix_is_released_at_the_end() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ends with ST") == "ends with "
    assert matcher.finish() == "ST"
    assert not matcher.stopped


def test_no_stops_passes_text_through_immediately() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc"
    assert matcher.finish() == ""


@given(
    text=st.text(alphabet="ab#<>/s", max_size=40),
    stops=st.lists(st.text(alphabet="ab#<>/s", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_random_splits_match_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(pieces, stops) == reference(text, stops)
