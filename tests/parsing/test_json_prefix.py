"""Streamed arguments always concatenate to JSON that parses, wherever the model stops."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mimoserve.parsing.call_stream import ArgumentStream, EnvelopeStream
from mimoserve.parsing.events import ToolCallArgs, ToolCallEnd, ToolCallStart
from mimoserve.parsing.json_prefix import JsonPrefix

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip


def streamed(pieces: list[str]) -> str:
    stream = ArgumentStream()
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    assert isinstance(events[-1], ToolCallEnd)
    return "".join(e.text for e in events if isinstance(e, ToolCallArgs))


@settings(max_examples=300)
@given(document=st.dictionaries(st.text(max_size=5), values, max_size=4),
       indent=st.sampled_from([None, 2]), cut=st.floats(0, 1))  # fmt: skip
def test_every_prefix_of_an_object_completes_to_json(
    document: dict[str, Any], indent: int | None, cut: float
) -> None:
    text = json.dumps(document, indent=indent, ensure_ascii=bool(indent))
    prefix = text[: int(len(text) * cut)]
    out = streamed([prefix])
    assert isinstance(json.loads(out), dict)
    assert streamed([text]) == text  # whole: passed through unchanged


@settings(max_examples=300)
@given(junk=st.text(max_size=30), document=st.dictionaries(st.text(max_size=4), values, max_size=3))
def test_invalid_text_is_cut_where_it_stops_being_json(junk: str, document: dict[str, Any]) -> None:
    text = json.dumps(document)[:-1] + junk
    assert isinstance(json.loads(streamed([text])), dict)


def test_pieces_stream_as_they_arrive_with_a_trailing_comma_held() -> None:
    stream = ArgumentStream()
    assert stream.feed('{"a": 1,') == [ToolCallArgs('{"a": 1')]
    assert stream.feed(' "b"') == [ToolCallArgs(', "b"')]
    assert stream.finish() == [ToolCallArgs(":null}"), ToolCallEnd()]


def test_the_envelope_streams_once_a_declared_name_is_known() -> None:
    stream = EnvelopeStream({"search"})
    assert stream.feed('{"name": "sea') == []
    assert stream.feed('rch", "arguments": {"q"') == [ToolCallStart("search"), ToolCallArgs('{"q"')]
    assert stream.feed(': "x"}}') == [ToolCallArgs(': "x"}')]
    assert stream.finish() == [ToolCallEnd()]
    unknown = EnvelopeStream({"search"})
    unknown.feed('{"name": "other", "arguments": {}}')
    assert unknown.opaque and unknown.finish() == []


def test_escapes_and_literals_are_completed() -> None:
    for prefix in [
        '{"a": "x\\',
        '{"a": "\\u00',
        '{"a": tr',
        '{"a": -',
        '{"a": 1.',
        '{"a": [1, {"b"',
    ]:
        prefix_state = JsonPrefix()
        prefix_state.feed(prefix)
        json.loads(prefix[: prefix_state.safe] + prefix_state.closing())
