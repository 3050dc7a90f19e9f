"""From raw model text to reasoning, content and tool-call events, per request.

Streaming and non-streaming answers are both built from these events, so the two are
the same answer by construction. Calls always come out as `ToolCallStart`, argument
pieces and `ToolCallEnd`: streamed as written where the call is certain (a forced
call, a required one once its name is written, a `<tool_call>` block), in one piece
where it could only be recognised at the end (a bare JSON answer, MiMo XML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimoserve.parsing.bare_json import BareJsonCalls, parse_bare_calls
from mimoserve.parsing.call_stream import ArgumentStream, EnvelopeStream
from mimoserve.parsing.events import (
    ContentText,
    ParsedEvent,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallParsed,
    ToolCallStart,
)
from mimoserve.parsing.output import OutputFormat, OutputParser


@dataclass(frozen=True)
class OutputPlan:
    fmt: OutputFormat = field(default_factory=OutputFormat)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    bare_json: bool = False
    # Constrained decoding forced the whole output to be one call:
    forced_name: str | None = None  # ... the arguments of this function,
    forced_any: bool = False  # ... or {"name": ..., "arguments": ...} of any tool.


def _expanded(events: list[ParsedEvent]) -> list[ParsedEvent]:
    out: list[ParsedEvent] = []
    for event in events:
        if isinstance(event, ToolCallParsed):
            out += [ToolCallStart(event.name), ToolCallArgs(event.arguments), ToolCallEnd()]
        else:
            out.append(event)
    return out


class OutputAssembler:
    """Feeds raw text through the plan's parsers; `finish()` flushes at end of generation."""

    def __init__(self, plan: OutputPlan) -> None:
        self._plan = plan
        self._parser = OutputParser(plan.fmt, plan.tools)
        self._bare = BareJsonCalls(plan.tools) if plan.bare_json and plan.tools else None
        self._named: ArgumentStream | None = None
        self._envelope: EnvelopeStream | None = None
        if plan.forced_name is not None:
            self._named = ArgumentStream()
        elif plan.forced_any:
            self._envelope = EnvelopeStream(plan.tools)
        self._started = False

    @property
    def in_think(self) -> bool:
        return self._parser.in_think

    def feed(self, text: str) -> list[ParsedEvent]:
        if self._named is not None:
            start: list[ParsedEvent] = []
            if not self._started:
                self._started = True
                start = [ToolCallStart(self._plan.forced_name or "")]
            return start + list(self._named.feed(text))
        if self._envelope is not None:
            return list(self._envelope.feed(text))
        events = self._parser.feed(text)
        return _expanded(self._bare.feed(events) if self._bare else events)

    def finish(self) -> list[ParsedEvent]:
        if self._named is not None:
            start: list[ParsedEvent] = (
                [] if self._started else [ToolCallStart(self._plan.forced_name or "")]
            )
            return start + list(self._named.finish())
        if self._envelope is not None:
            return self._finish_envelope(self._envelope)
        events = self._parser.finish()
        if self._bare:
            events = self._bare.feed(events) + self._bare.finish()
        return _expanded(events)

    def _finish_envelope(self, envelope: EnvelopeStream) -> list[ParsedEvent]:
        if envelope.started:
            return list(envelope.finish())
        calls = parse_bare_calls(envelope.body, self._plan.tools)
        if calls:
            return _expanded(list(calls))
        # Cut short before the name (e.g. by max_completion_tokens): the text, not lost.
        return [ContentText(envelope.body)] if envelope.body else []
