"""What the parsers produce from raw model text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningText:
    text: str


@dataclass(frozen=True)
class ContentText:
    text: str


@dataclass(frozen=True)
class ToolCallParsed:
    """One complete call; `arguments` is a JSON object serialised as a string."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call has begun; its arguments follow as `ToolCallArgs` pieces, then `ToolCallEnd`."""

    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A piece of the call's arguments; the pieces concatenated are one JSON object."""

    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    pass


ParsedEvent = (
    ReasoningText | ContentText | ToolCallParsed | ToolCallStart | ToolCallArgs | ToolCallEnd
)
