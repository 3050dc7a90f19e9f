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


ParsedEvent = ReasoningText | ContentText | ToolCallParsed
