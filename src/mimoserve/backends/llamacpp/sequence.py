"""One request's life inside the scheduler: its tokens, its text, when it ends.

Everything here is per sequence, so sequences decoded in the same batch never share
sampling, stop handling, reasoning state or token accounting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mimoserve.backends.base import (
    FinishReason,
    GenerationEvent,
    SamplingParams,
)
from mimoserve.parsing.stop import StopMatcher
from mimoserve.parsing.utf8 import Utf8Stream

Emit = Callable[[GenerationEvent | BaseException], None]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What the engine writes when a think block must be closed for the model.
FORCED_CLOSE = "\n</think>\n\n"


@dataclass(eq=False)  # identity semantics: jobs live in sets and queues
class DecodeJob:
    prompt: list[int]
    sampling: SamplingParams
    emit: Emit
    grammar: str | None = None  # GBNF, or None for free text
    # Reasoning: already inside <think> when the prompt opened it; closed at the budget.
    in_think: bool = False
    think_budget: int | None = None
    # Set by the requester when its client goes away; checked before every step.
    cancelled: threading.Event = field(default_factory=threading.Event)


class ReasoningTracker:
    """Follows <think> ... </think> in the generated text to count reasoning tokens."""

    def __init__(self, in_think: bool, budget: int | None) -> None:
        self.active = in_think
        self.tokens = 0
        self.closed = False  # a think block was open and has been closed
        self.answered = False  # non-blank text followed the closed block
        self._budget = budget
        self._tail = ""

    def observe(self, text: str) -> None:
        if self.active:
            self.tokens += 1
        elif self.closed and text.strip() and THINK_CLOSE not in self._tail + text:
            self.answered = True
        window = self._tail + text
        tag = THINK_CLOSE if self.active else THINK_OPEN
        if tag in window:
            self.active = not self.active
            self.closed = self.closed or not self.active
            window = window[window.index(tag) + len(tag) :]
        self._tail = window[-len(THINK_CLOSE) :]

    @property
    def over_budget(self) -> bool:
        return self.active and self._budget is not None and self.tokens >= self._budget

    @property
    def answer_pending(self) -> bool:
        """Reasoning is over but no answer has been written yet."""
        return self.closed and not self.active and not self.answered

    def force_close(self) -> None:
        self.active = False
        self.closed = True
        self._tail = ""


@dataclass(frozen=True)
class Step:
    """What one sampled token leads to."""

    text: str = ""
    finished: FinishReason | None = None
    inject: tuple[int, ...] = ()  # tokens the engine writes next, before sampling again


class SequenceOutput:
    """Turns sampled tokens into text and decides when the sequence ends."""

    def __init__(
        self,
        job: DecodeJob,
        limit: int,
        token_bytes: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        forced_close: list[int],
    ) -> None:
        self._limit = limit
        self._token_bytes = token_bytes
        self._is_end = is_end
        self._forced_close = forced_close
        self._utf8 = Utf8Stream()
        self._stops = StopMatcher(job.sampling.stop)
        self.reasoning = ReasoningTracker(job.in_think, job.think_budget)
        self.completion_tokens = 0
        # Prompted thinking promises reasoning *and* an answer: small models often close
        # the think block and stop, so ending the turn is forbidden until an answer starts.
        self._require_answer = job.in_think
        # Under a grammar every token must be one the grammar accepted: the engine never
        # writes `</think>` itself, so `<think>` inside a JSON string is just text.
        self._track_reasoning = job.grammar is None

    @property
    def must_not_end(self) -> bool:
        return self._require_answer and self.reasoning.answer_pending

    def on_token(self, token: int) -> Step:
        self.completion_tokens += 1
        ended = self._is_end(token)
        text = ""
        if not ended:
            piece = self._utf8.feed(self._token_bytes(token))
            if self._track_reasoning:
                self.reasoning.observe(piece)
            text = self._stops.feed(piece)
            if self._stops.stopped:
                return Step(text, "stop")
            if self.completion_tokens >= self._limit:
                return Step(text, "length")
        reasoning = self.reasoning
        must_close = reasoning.active and (ended or reasoning.over_budget)
        if must_close and self.completion_tokens + len(self._forced_close) < self._limit:
            # The model left its think block open: write `</think>` for it, go on.
            self.completion_tokens += len(self._forced_close)
            reasoning.force_close()
            text += self._stops.feed(FORCED_CLOSE)
            return Step(text, inject=tuple(self._forced_close))
        if ended:
            return Step(text, "stop")
        return Step(text)

    def flush(self) -> str:
        """Text held back (partial characters, possible stop prefixes) at the end."""
        return self._stops.feed(self._utf8.finish()) + self._stops.finish()
