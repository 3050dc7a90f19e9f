"""From raw model text to reasoning, content and tool-call events, per request.

Streaming and non-streaming answers are both built from these events, so the two are
the same answer by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mimoserve.parsing.bare_json import BareJsonCalls, parse_bare_calls
from mimoserve.parsing.events import ContentText, ParsedEvent, ToolCallParsed
from mimoserve.parsing.output import OutputFormat, OutputParser
from mimoserve.parsing.safe_json import loads_or_not_json


@dataclass(frozen=True)
class OutputPlan:
    fmt: OutputFormat = field(default_factory=OutputFormat)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    bare_json: bool = False
    # Constrained decoding forced the whole output to be one call:
    forced_name: str | None = None  # ... the arguments of this function,
    forced_any: bool = False  # ... or {"name": ..., "arguments": ...} of any tool.


class OutputAssembler:
    """Feeds raw text through the plan's parsers; `finish()` flushes at end of generation."""

    def __init__(self, plan: OutputPlan) -> None:
        self._plan = plan
        self._forced = plan.forced_name is not None or plan.forced_any
        self._parser = OutputParser(plan.fmt, plan.tools)
        self._bare = BareJsonCalls(plan.tools) if plan.bare_json and plan.tools else None
        self._held = ""

    def feed(self, text: str) -> list[ParsedEvent]:
        if self._forced:
            self._held += text  # a forced call is only whole at the end
            return []
        events = self._parser.feed(text)
        return self._bare.feed(events) if self._bare else events

    def finish(self) -> list[ParsedEvent]:
        if self._forced:
            return self._finish_forced()
        events = self._parser.finish()
        if self._bare:
            events = self._bare.feed(events) + self._bare.finish()
        return events

    def _finish_forced(self) -> list[ParsedEvent]:
        text, self._held = self._held, ""
        if self._plan.forced_name is not None:
            arguments = loads_or_not_json(text)
            if isinstance(arguments, dict):
                dumped = json.dumps(arguments, ensure_ascii=False)
                return [ToolCallParsed(self._plan.forced_name, dumped)]
        else:
            calls = parse_bare_calls(text, self._plan.tools)
            if calls:
                return list(calls)
        # Cut short (e.g. by max_completion_tokens): the text is returned, not lost.
        return [ContentText(text)] if text else []
