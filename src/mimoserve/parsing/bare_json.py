"""Recognises an answer that is nothing but a JSON tool call, without `<tool_call>` tags.

Small models given tools through their template (Qwen2.5-0.5B measured here) often
answer `{"name": "get_weather", "arguments": {...}}`, bare or in a ```json fence. Such
an answer becomes a tool call only when the *whole* content is one JSON object (or a
list of them) naming a declared tool; any other text passes through unchanged. Content
that starts like JSON is held until the end to decide, everything else streams at once.
"""

from __future__ import annotations

from mimoserve.parsing.events import ContentText, ParsedEvent, ToolCallParsed
from mimoserve.parsing.safe_json import NOT_JSON, loads_or_not_json
from mimoserve.parsing.tool_formats import ToolSchemas, parse_json_call

_FENCE = "```"


def _unfenced(text: str) -> str:
    """The body of a ```json fence that is the whole text, else the text.

    Plain string operations, not a regular expression: `\\s*(.*?)\\s*` over a fence and
    a few thousand spaces backtracked cubically (17 s for 4,000 of them).
    """
    if len(text) < 2 * len(_FENCE) or not (text.startswith(_FENCE) and text.endswith(_FENCE)):
        return text
    body = text[len(_FENCE) : -len(_FENCE)]
    return body.removeprefix("json").strip()


def parse_bare_calls(text: str, tools: ToolSchemas) -> list[ToolCallParsed] | None:
    data = loads_or_not_json(_unfenced(text.strip()))
    if data is NOT_JSON:
        return None
    items = data if isinstance(data, list) else [data]
    calls = [parse_json_call(item, tools) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


class BareJsonCalls:
    """Filters parsed events: content that is wholly a JSON call becomes a tool call."""

    def __init__(self, tools: ToolSchemas) -> None:
        self._tools = tools
        self._decided = False  # True once content is known not to be a bare call
        self._held = ""

    def feed(self, events: list[ParsedEvent]) -> list[ParsedEvent]:
        out: list[ParsedEvent] = []
        for event in events:
            if not isinstance(event, ContentText) or self._decided:
                out.append(event)
                continue
            self._held += event.text
            start = self._held.lstrip()
            if start and not ("```".startswith(start[:3]) or start[0] in "{["):
                self._decided = True
                out.append(ContentText(self._held))
                self._held = ""
        return out

    def finish(self) -> list[ParsedEvent]:
        held, self._held = self._held, ""
        if not held:
            return []
        calls = parse_bare_calls(held, self._tools)
        if calls is None:
            return [ContentText(held)]
        return list(calls)
