"""Model text -> the backend events, for engines that generate plain text.

The parsers (parsing/assembler.py) say what the text is; this numbers the tool calls
and gives each its id, so every backend's calls look alike.
"""

from __future__ import annotations

import uuid

from mimoserve.events import (
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallEnded,
    ToolCallStarted,
)
from mimoserve.parsing.assembler import OutputAssembler, OutputPlan
from mimoserve.parsing.events import (
    ContentText,
    ParsedEvent,
    ReasoningText,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StructuredOutput:
    def __init__(self, plan: OutputPlan) -> None:
        self._assembler = OutputAssembler(plan)
        self.calls = 0  # calls started so far
        self.answered = False  # content or a call has been produced

    @property
    def in_think(self) -> bool:
        return self._assembler.in_think

    def feed(self, text: str) -> list[OutputEvent]:
        return self._numbered(self._assembler.feed(text)) if text else []

    def finish(self) -> list[OutputEvent]:
        return self._numbered(self._assembler.finish())

    def _numbered(self, parsed: list[ParsedEvent]) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        for event in parsed:
            if isinstance(event, ReasoningText):
                out.append(ReasoningDelta(event.text))
                continue
            self.answered = True
            if isinstance(event, ContentText):
                out.append(ContentDelta(event.text))
            elif isinstance(event, ToolCallStart):
                out.append(ToolCallStarted(self.calls, new_call_id(), event.name))
                self.calls += 1
            elif isinstance(event, ToolCallArgs):
                out.append(ToolCallDelta(self.calls - 1, event.text))
            elif isinstance(event, ToolCallEnd):
                out.append(ToolCallEnded(self.calls - 1))
        return out
