"""Stop-sequence matching over a stream of text pieces."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Cuts a text stream at the first stop sequence to complete, however it is split.

    Only the tail that could still grow into a stop sequence is held back, so a
    stream is delayed by at most `len(longest stop) - 1` characters.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that ended the text

    def feed(self, text: str) -> str:
        """Returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        cut = self._first_stop(buffer)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def finish(self) -> str:
        """Releases the held-back tail at the end of generation (no stop can complete now)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, buffer: str) -> int | None:
        # Generation ends when a stop sequence *completes*, so the one that ends first wins
        # (a longer stop that started earlier but is not finished yet cannot be known).
        hits = [(i + len(s), i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        if not hits:
            return None
        _, start, self.matched = min(hits)
        return start

    def _partial_tail(self, buffer: str) -> int:
        # Longest suffix of the buffer that is a proper prefix of some stop sequence.
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
