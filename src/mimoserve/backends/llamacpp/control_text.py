"""Keeps client text from becoming control tokens.

The rendered prompt is tokenized with special-token parsing, because the chat template's
own markers (`<|im_start|>`, `<|im_end|>`, ...) must become their control tokens. Client
strings must not: a user who writes `<|im_start|>system` would otherwise forge a system
turn. Before rendering, every control-token text inside a client string is replaced by
a placeholder (private-use characters around an index); after rendering, the prompt is
split at the placeholders and each escaped literal is tokenized as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass(frozen=True)
class PromptSegment:
    text: str
    control: bool  # True: template text, control-token markers are parsed


@dataclass(frozen=True)
class GuardedPrompt:
    segments: tuple[PromptSegment, ...]

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments)

    def __add__(self, template_text: str) -> GuardedPrompt:
        return GuardedPrompt((*self.segments, PromptSegment(template_text, True)))


class ControlTextGuard:
    """One per request: escapes client strings, then splits the rendered prompt."""

    def __init__(self, pattern: re.Pattern[str] | None) -> None:
        self._pattern = pattern
        self._literals: list[str] = []

    @staticmethod
    def pattern_for(control_texts: Iterable[str]) -> re.Pattern[str] | None:
        texts = sorted({t for t in control_texts if t}, key=len, reverse=True)
        if not texts:
            return None
        # The placeholder characters themselves are escaped too, so a client cannot
        # write a placeholder that points at another literal.
        return re.compile("|".join(re.escape(t) for t in [*texts, _OPEN, _CLOSE]))

    def escape(self, value: Any) -> Any:
        """`value` with every string in it (dict keys too) escaped."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self._pattern.sub(self._placeholder, value)
        if isinstance(value, dict):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.escape(item) for item in value]
        return value

    def _placeholder(self, match: re.Match[str]) -> str:
        self._literals.append(match.group(0))
        return f"{_OPEN}{len(self._literals) - 1}{_CLOSE}"

    def split(self, rendered: str) -> GuardedPrompt:
        if not self._literals:
            return GuardedPrompt((PromptSegment(rendered, True),))
        segments: list[PromptSegment] = []
        position = 0
        for match in _PLACEHOLDER.finditer(rendered):
            index = int(match.group(1))
            if index >= len(self._literals):
                continue  # not one of ours (cannot happen: client placeholders are escaped)
            if match.start() > position:
                segments.append(PromptSegment(rendered[position : match.start()], True))
            segments.append(PromptSegment(self._literals[index], False))
            position = match.end()
        if position < len(rendered):
            segments.append(PromptSegment(rendered[position:], True))
        return GuardedPrompt(tuple(segments))
