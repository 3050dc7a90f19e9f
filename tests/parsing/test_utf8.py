from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mimoserve.parsing.stop import StopMatcher
from mimoserve.parsing.utf8 import Utf8Stream
from tests.parsing.splits import every_split


def decode(pieces: list[bytes]) -> str:
    stream = Utf8Stream()
    return "".join(stream.feed(piece) for piece in pieces) + stream.finish()


@pytest.mark.parametrize("text", ["héllo", "你好", "a😀b", "ÿ€𝄞"])
def test_every_byte_split_decodes_to_the_same_text(text: str) -> None:
    data = text.encode()
    for pieces in every_split(data):
        assert decode(pieces) == text, pieces


def test_no_partial_character_is_ever_emitted() -> None:
    stream = Utf8Stream()
    emoji = "😀".encode()
    assert stream.feed(emoji[:1]) == ""
    assert stream.feed(emoji[1:3]) == ""
    assert stream.feed(emoji[3:]) == "😀"


def test_truncated_character_becomes_a_replacement_not_silence() -> None:
    assert decode([b"a", "你".encode()[:2]]) == "a\ufffd"


@given(text=st.text(max_size=30), cuts=st.lists(st.integers(0, 120), max_size=12))
def test_random_byte_splits_through_decoder_and_stop_matcher(text: str, cuts: list[int]) -> None:
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    stream, matcher = Utf8Stream(), StopMatcher(["\u4e16\u754c"])
    out = "".join(matcher.feed(stream.feed(p)) for p in pieces)
    out += matcher.feed(stream.finish()) + matcher.finish()
    cut = text.find("\u4e16\u754c")
    assert out == (text if cut < 0 else text[:cut])
