"""Streams one tool call's arguments as the model writes them.

Two shapes: the arguments object alone (a call whose name is already known: a named
`tool_choice`), and the Hermes envelope `{"name": N, "arguments": {...}}` (Qwen's and
MiMo's `<tool_call>` bodies, and `tool_choice: "required"`). The envelope's head is
held until the name is known and declared; from then on every valid piece of the
arguments object is passed on, and `finish()` closes whatever the model left open, so
the concatenated arguments always parse. A body whose head does not look like that
(another key order, an unknown name) is `opaque`: the caller parses it whole at the end.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from mimoserve.parsing.events import ToolCallArgs, ToolCallEnd, ToolCallStart
from mimoserve.parsing.json_prefix import JsonPrefix

# The head, up to the arguments object's opening brace (a string there is not streamed).
_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
_HEAD_LIMIT = 160  # a head longer than this is not the envelope we stream

CallEvent = ToolCallStart | ToolCallArgs | ToolCallEnd


class ArgumentStream:
    """The arguments object of a call already started."""

    def __init__(self) -> None:
        self._json = JsonPrefix()
        self._text = ""  # everything fed that was accepted
        self._sent = 0

    @property
    def complete(self) -> bool:
        return self._json.done

    def feed(self, text: str) -> list[CallEvent]:
        taken = self._json.feed(text)
        self._text += text[:taken]
        return self._flush(self._json.safe)

    def _flush(self, upto: int) -> list[CallEvent]:
        piece = self._text[self._sent : upto]
        self._sent = max(self._sent, upto)
        return [ToolCallArgs(piece)] if piece else []

    def finish(self) -> list[CallEvent]:
        if self._sent == 0 and not self._text.strip():
            return [ToolCallArgs("{}"), ToolCallEnd()]  # nothing written: no arguments
        events = self._flush(self._json.safe)
        closing = self._json.closing()
        return [*events, *([ToolCallArgs(closing)] if closing else []), ToolCallEnd()]


class EnvelopeStream:
    """`{"name": N, "arguments": {...}}`, streamed once N is known to be a declared tool."""

    def __init__(self, tools: Collection[str]) -> None:
        self._tools = tools
        self._head = ""
        self._args: ArgumentStream | None = None
        self.opaque = False  # not streamable: the caller parses the whole body at the end
        self.body = ""  # everything fed, for that whole-body parse

    @property
    def started(self) -> bool:
        return self._args is not None

    def feed(self, text: str) -> list[CallEvent]:
        self.body += text
        if self.opaque:
            return []
        if self._args is not None:
            return self._args.feed(text)
        self._head += text
        match = _HEAD.match(self._head)
        if match is None:
            stripped = self._head.lstrip()
            if len(self._head) > _HEAD_LIMIT or (stripped and not stripped.startswith("{")):
                self.opaque = True
            return []
        if match.group(1) not in self._tools:
            self.opaque = True
            return []
        self._args = ArgumentStream()
        rest, self._head = self._head[match.end() :], ""
        return [ToolCallStart(match.group(1)), *self._args.feed(rest)]

    def finish(self) -> list[CallEvent]:
        """Closes a started call; [] when it never started (opaque or cut in the head)."""
        return self._args.finish() if self._args is not None else []
