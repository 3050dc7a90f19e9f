"""Splits raw model text into reasoning, content and tool calls, incrementally.

One state machine handles `<think>...</think>` and `<tool_call>...</tool_call>`, so a
tool call written inside the think block is still returned as a call. A Hermes call
whose head names a declared tool streams its arguments as they are written (see
call_stream.py: the pieces always concatenate to JSON that parses). Any other body (MiMo
XML, an unknown name, another key order) is held until its closing tag and parsed
whole: a malformed one comes back as text of the channel it was written in, never lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mimoserve.parsing.call_stream import EnvelopeStream
from mimoserve.parsing.events import (
    ContentText,
    ParsedEvent,
    ReasoningText,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallParsed,
    ToolCallStart,
)
from mimoserve.parsing.tool_formats import ToolFormat, ToolSchemas, parse_tool_body

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class OutputFormat:
    think: bool = False  # parse <think> blocks
    start_in_think: bool = False  # the prompt already opened the think block
    tool_format: ToolFormat | None = None  # parse <tool_call> blocks in this format


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a tag."""
    for size in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-size:]) for tag in tags):
            return size
    return 0


class OutputParser:
    def __init__(self, fmt: OutputFormat, tools: ToolSchemas) -> None:
        self._fmt = fmt
        self._tools = tools
        self._in_think = fmt.think and fmt.start_in_think
        self._in_call = False
        self._call: EnvelopeStream | None = None
        self._pending = ""
        # Whitespace right after a tag is layout, not text (e.g. "</think>\n\n").
        self._skip_space = True

    def _tags(self) -> tuple[str, ...]:
        if self._in_call:
            return (CALL_CLOSE,)
        tags: list[str] = []
        if self._fmt.think:
            tags.append(THINK_CLOSE if self._in_think else THINK_OPEN)
        if self._fmt.tool_format and self._tools:
            tags.append(CALL_OPEN)
        return tuple(tags)

    def _text(self, text: str) -> list[ParsedEvent]:
        if not text:
            return []
        if self._skip_space:
            text = text.lstrip()
            if not text:
                return []
            self._skip_space = False
        if self._in_call:
            assert self._call is not None
            return list(self._call.feed(text))
        return [ReasoningText(text) if self._in_think else ContentText(text)]

    def _tag(self, tag: str) -> list[ParsedEvent]:
        events: list[ParsedEvent] = []
        if tag == THINK_OPEN:
            self._in_think = True
        elif tag == THINK_CLOSE:
            self._in_think = False
        elif tag == CALL_OPEN:
            self._in_call, self._call = True, EnvelopeStream(self._streamable_tools())
        else:
            events = self._close_call(CALL_CLOSE)
        # A call's body keeps its layout; elsewhere whitespace after a tag is dropped.
        self._skip_space = tag != CALL_OPEN
        return events

    def _streamable_tools(self) -> frozenset[str]:
        # MiMo XML converts parameters by schema at the end: only Hermes JSON streams.
        return frozenset(self._tools) if self._fmt.tool_format == "hermes" else frozenset()

    @property
    def in_think(self) -> bool:
        return self._in_think

    def _close_call(self, closing: str) -> list[ParsedEvent]:
        self._in_call = False
        call_stream, self._call = self._call, None
        assert call_stream is not None
        if call_stream.started:
            return list(call_stream.finish())
        body = call_stream.body
        call = parse_tool_body(self._fmt.tool_format or "hermes", body, self._tools)
        if call is not None:
            return [call]
        raw = f"{CALL_OPEN}{body}{closing}"
        return [ReasoningText(raw) if self._in_think else ContentText(raw)]

    def feed(self, text: str) -> list[ParsedEvent]:
        self._pending += text
        events: list[ParsedEvent] = []
        while self._pending:
            tags = self._tags()
            hits = [(i, tag) for tag in tags if (i := self._pending.find(tag)) >= 0]
            if not hits:
                keep = _partial_tag_length(self._pending, tags) if tags else 0
                cut = len(self._pending) - keep
                events += self._text(self._pending[:cut])
                self._pending = self._pending[cut:]
                break
            index, tag = min(hits)
            events += self._text(self._pending[:index])
            self._pending = self._pending[index + len(tag) :]
            events += self._tag(tag)
        return events

    def finish(self) -> list[ParsedEvent]:
        """End of generation: what is held back is text; an unclosed call is tried as-is."""
        pending, self._pending = self._pending, ""
        events = self._text(pending)
        if self._in_call:
            events += self._close_call("")
        return events


def merge_text(events: list[ParsedEvent]) -> list[ParsedEvent]:
    """Joins neighbouring text events of one kind, and a streamed call's pieces into one
    `ToolCallParsed` (splitting must not change the merged form)."""
    merged: list[ParsedEvent] = []
    streaming: tuple[str, list[str]] | None = None
    for event in events:
        if isinstance(event, ToolCallStart):
            streaming = (event.name, [])
            continue
        if isinstance(event, ToolCallArgs) and streaming is not None:
            streaming[1].append(event.text)
            continue
        if isinstance(event, ToolCallEnd) and streaming is not None:
            arguments = json.dumps(json.loads("".join(streaming[1])), ensure_ascii=False)
            merged.append(ToolCallParsed(streaming[0], arguments))
            streaming = None
            continue
        last = merged[-1] if merged else None
        if isinstance(event, ReasoningText) and isinstance(last, ReasoningText):
            merged[-1] = ReasoningText(last.text + event.text)
        elif isinstance(event, ContentText) and isinstance(last, ContentText):
            merged[-1] = ContentText(last.text + event.text)
        else:
            merged.append(event)
    return merged


__all__ = ["OutputFormat", "OutputParser", "ToolCallParsed", "merge_text"]
