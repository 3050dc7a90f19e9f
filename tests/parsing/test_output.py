from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimoserve.parsing.bare_json import BareJsonCalls
from mimoserve.parsing.events import ContentText, ParsedEvent, ReasoningText, ToolCallParsed
from mimoserve.parsing.output import OutputFormat, OutputParser, merge_text
from mimoserve.parsing.tool_formats import convert_parameter
from tests.parsing.splits import every_split

TOOLS: dict[str, Any] = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                       "metric": {"type": "boolean"}, "tags": {"type": "array"}},
    },
    "search": {"type": "object", "properties": {"q": {"type": "string"}}},
}  # fmt: skip

THINK = OutputFormat(think=True)
HERMES = OutputFormat(think=True, tool_format="hermes")
MIMO = OutputFormat(think=True, tool_format="mimo_xml")


def parse(pieces: list[str], fmt: OutputFormat, bare: bool = False) -> list[ParsedEvent]:
    parser = OutputParser(fmt, TOOLS)
    filt = BareJsonCalls(TOOLS) if bare else None
    events: list[ParsedEvent] = []
    for piece in pieces:
        out = parser.feed(piece)
        events += filt.feed(out) if filt else out
    out = parser.finish()
    events += filt.feed(out) + filt.finish() if filt else out
    return merge_text(events)


def call(name: str, **arguments: Any) -> ToolCallParsed:
    return ToolCallParsed(name, json.dumps(arguments, ensure_ascii=False))


CASES: list[tuple[str, OutputFormat, list[ParsedEvent]]] = [
    ("<think>Let me add.</think>\n\nThe answer is 4.", THINK,
     [ReasoningText("Let me add."), ContentText("The answer is 4.")]),
    ("plain answer, no tags", HERMES, [ContentText("plain answer, no tags")]),
    ("<think>unterminated reasoning", THINK, [ReasoningText("unterminated reasoning")]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>', HERMES,
     [call("get_weather", city="北京")]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n'
     '<tool_call>{"name": "search", "arguments": {"q": "b"}}</tool_call>', HERMES,
     [call("get_weather", city="A"), call("search", q="b")]),
    ('<think>I should call it <tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
     "</think>Done.", HERMES,
     [ReasoningText("I should call it "), call("search", q="x"), ContentText("Done.")]),
    # A call that streamed its head is a call: what the model left open is closed.
    ('Before <tool_call>{"name": "search", "arguments": {"q": </tool_call> after', HERMES,
     [ContentText("Before "), call("search", q=None), ContentText("after")]),
    ('<tool_call>{"name": "search", "arguments": {"q": \'x\'}}</tool_call>', HERMES,
     [call("search", q=None)]),
    # Not the streamable head (arguments first): parsed whole, malformed -> text.
    ('<tool_call>{"arguments": {"q": 1, "name": "search"</tool_call>', HERMES,
     [ContentText('<tool_call>{"arguments": {"q": 1, "name": "search"</tool_call>')]),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', HERMES,
     [ContentText('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')]),
    ('<tool_call>{"name": "search", "arguments": {"q": "cut"}}', HERMES, [call("search", q="cut")]),
    ('<tool_call>{"name": "search", "argu', HERMES, [ContentText('<tool_call>{"name": "search", "argu')]),
    ("ends with a partial tag <tool_ca", HERMES, [ContentText("ends with a partial tag <tool_ca")]),
    ("ends with <thi", THINK, [ContentText("ends with <thi")]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nBeijing\n</parameter>\n"
     "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", MIMO,
     [call("get_weather", city="Beijing", days=3)]),
    ("<tool_call><function=get_weather><parameter=city>New York</parameter>"
     "<parameter=metric>true</parameter><parameter=tags>[\"a\"]</parameter></function></tool_call>"
     "<tool_call><function=search><parameter=q>7</parameter></function></tool_call>", MIMO,
     [call("get_weather", city="New York", metric=True, tags=["a"]), call("search", q="7")]),
    ("<tool_call><function=get_weather>stray text</function></tool_call>", MIMO,
     [ContentText("<tool_call><function=get_weather>stray text</function></tool_call>")]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "fmt", "expected"), CASES)
def test_whole_text(text: str, fmt: OutputFormat, expected: list[ParsedEvent]) -> None:
    assert parse([text], fmt) == expected


@pytest.mark.parametrize(("text", "fmt", "expected"), CASES)
def test_every_split_gives_the_same_events(
    text: str, fmt: OutputFormat, expected: list[ParsedEvent]
) -> None:
    for pieces in every_split(text, max_cuts=2):
        assert parse(pieces, fmt) == expected, pieces


def test_prompted_thinking_starts_inside_the_block() -> None:
    fmt = OutputFormat(think=True, start_in_think=True)
    assert parse(["\nworking it out\n</think>\n\nAnswer."], fmt) == [
        ReasoningText("working it out\n"),
        ContentText("Answer."),
    ]


def test_tool_tags_are_plain_text_without_declared_tools() -> None:
    parser = OutputParser(HERMES, {})
    text = '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
    assert merge_text(parser.feed(text) + parser.finish()) == [ContentText(text)]


BARE_CASES: list[tuple[str, list[ParsedEvent]]] = [
    ('{"name": "search", "arguments": {"q": "cats"}}', [call("search", q="cats")]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
     [call("get_weather", city="Oslo")]),
    ('[{"name": "search", "arguments": {"q": "a"}}, {"name": "search", "parameters": {"q": "b"}}]',
     [call("search", q="a"), call("search", q="b")]),
    ('{"name": "unknown", "arguments": {}}', [ContentText('{"name": "unknown", "arguments": {}}')]),
    ('{"city": "Oslo"}', [ContentText('{"city": "Oslo"}')]),
    ("Sure! Here you go.", [ContentText("Sure! Here you go.")]),
    ('{"name": "search", "arguments": {"q": "x"}} and more',
     [ContentText('{"name": "search", "arguments": {"q": "x"}} and more')]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BARE_CASES)
def test_bare_json_calls_in_every_split(text: str, expected: list[ParsedEvent]) -> None:
    for pieces in every_split(text, max_cuts=2):
        assert parse(pieces, HERMES, bare=True) == expected, pieces


def test_plain_answers_stream_without_waiting() -> None:
    filt = BareJsonCalls(TOOLS)
    assert filt.feed([ContentText("Hel")]) == [ContentText("Hel")]
    assert filt.feed([ContentText('{"x"')]) == [ContentText('{"x"')]


@pytest.mark.parametrize(
    ("value", "schema", "expected"),
    [("42", {"type": "integer"}, 42), ("4.5", {"type": "number"}, 4.5), ("3", {"type": "number"}, 3),
     ("True", {"type": "boolean"}, True), ('{"a": 1}', {"type": "object"}, {"a": 1}),
     ("007", {"type": "string"}, "007"), ("abc", {"type": "integer"}, "abc"),
     ("null", {"type": ["integer", "null"]}, None), ("[1, 2]", {}, [1, 2]), ("plain", {}, "plain")],
)  # fmt: skip
def test_parameter_conversion_follows_the_schema(
    value: str, schema: dict[str, Any], expected: Any
) -> None:
    assert convert_parameter(value, schema) == expected


FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", " ", "hi", "<",
             '{"name": "search", "arguments": {"q": "z"}}', "{", "}", "<tool", "think>"]  # fmt: skip


@settings(max_examples=300)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=12),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    fmt=st.sampled_from(
        [THINK, HERMES, OutputFormat(think=True, start_in_think=True, tool_format="hermes")]
    ),
)
def test_random_texts_and_splits_match_the_whole(
    parts: list[str], cuts: list[int], fmt: OutputFormat
) -> None:
    text = "".join(parts)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    assert parse(pieces, fmt) == parse([text], fmt)
