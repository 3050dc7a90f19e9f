"""One request's life inside the scheduler: its tokens, its text, when it ends.

Everything here is per sequence, so sequences decoded in the same batch never share
sampling, stop handling, reasoning state or token accounting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mimoserve.backends.base import SamplingParams
from mimoserve.backends.structured import StructuredOutput
from mimoserve.events import Finished, FinishReason, OutputEvent, Started, TokenLogprob
from mimoserve.parsing.assembler import OutputPlan
from mimoserve.parsing.output import THINK_CLOSE
from mimoserve.parsing.stop import StopMatcher
from mimoserve.parsing.utf8 import Utf8Stream


@dataclass(frozen=True)
class Generated:
    """One step's output for one sequence: its events and the tokens they cost."""

    events: tuple[OutputEvent, ...]
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # when the request asked for them


EngineEvent = Started | Generated | Finished
Emit = Callable[[EngineEvent | BaseException], None]

# Steps of output a sequence may have waiting for its client before it is paused.
MAX_UNREAD_STEPS = 64

# What the engine writes when a think block must be closed for the model.
FORCED_CLOSE = f"\n{THINK_CLOSE}\n\n"


@dataclass(eq=False)  # identity semantics: jobs live in sets and queues
class DecodeJob:
    prompt: list[int]
    sampling: SamplingParams
    emit: Emit
    grammar: str | None = None  # GBNF, or None for free text
    plan: OutputPlan = field(default_factory=OutputPlan)  # how the text becomes events
    # Reasoning: already inside <think> when the prompt opened it; closed at the budget.
    in_think: bool = False
    think_budget: int | None = None
    # The client's guess of the answer (`prediction`), tokenized: the first draft source.
    prediction: list[int] = field(default_factory=list)
    # Set by the requester when its client goes away; checked before every step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Backpressure: steps emitted (written by the scheduler thread only) and steps the
    # requester has taken (written by the event loop only), so each count has one writer.
    # A sequence with `MAX_UNREAD_STEPS` steps not taken is not decoded until its client
    # reads: a client that stops reading stops costing the engine.
    emitted: int = 0
    taken: int = 0
    generated_tokens: int = 0  # completion tokens generated so far (scheduler thread)

    @property
    def backlog(self) -> int:
        return self.emitted - self.taken


@dataclass(frozen=True)
class Step:
    """What one sampled token leads to."""

    events: tuple[OutputEvent, ...] = ()
    finished: FinishReason | None = None
    inject: tuple[int, ...] = ()  # tokens the engine writes next, before sampling again


class SequenceOutput:
    """Turns sampled tokens into events and decides when the sequence ends.

    The parsers run here, beside the sampler: the one `<think>` state that splits
    reasoning from the answer also drives the thinking budget and the rule that a turn
    may not end inside the think block or before an answer follows it.
    """

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
        self.output = StructuredOutput(job.plan)
        self._budget = job.think_budget
        self.reasoning_tokens = 0
        self.completion_tokens = 0
        self._think_closed = False
        # Prompted thinking promises reasoning *and* an answer: small models often close
        # the think block and stop, so ending the turn is forbidden until an answer starts.
        self._require_answer = job.in_think

    @property
    def remaining(self) -> int:
        """Completion tokens it may still write."""
        return self._limit - self.completion_tokens

    @property
    def must_not_end(self) -> bool:
        return self._require_answer and self._think_closed and not self.output.answered

    def _over_budget(self) -> bool:
        return self._budget is not None and self.reasoning_tokens >= self._budget

    def _feed(self, text: str) -> list[OutputEvent]:
        was_thinking = self.output.in_think
        events = self.output.feed(self._stops.feed(text))
        if was_thinking and not self.output.in_think:
            self._think_closed = True
        return events

    def on_token(self, token: int) -> Step:
        self.completion_tokens += 1
        if self.output.in_think:
            self.reasoning_tokens += 1
        ended = self._is_end(token)
        events: list[OutputEvent] = []
        if not ended:
            events = self._feed(self._utf8.feed(self._token_bytes(token)))
            if self._stops.stopped:
                return Step(tuple(events), "stop")
            if self.completion_tokens >= self._limit:
                return Step(tuple(events), "length")
        must_close = self.output.in_think and (ended or self._over_budget())
        if must_close and self.completion_tokens + len(self._forced_close) < self._limit:
            # The model left its think block open: write `</think>` for it, go on.
            self.completion_tokens += len(self._forced_close)
            events += self._feed(FORCED_CLOSE)
            return Step(tuple(events), inject=tuple(self._forced_close))
        if ended:
            return Step(tuple(events), "stop")
        return Step(tuple(events))

    @property
    def stop_sequence(self) -> str | None:
        return self._stops.matched

    def flush(self) -> list[OutputEvent]:
        """At the end: text held back (partial characters, possible stop prefixes, partial
        tags) and whatever the parsers still hold (a bare JSON answer, an open call)."""
        tail = self._stops.feed(self._utf8.finish()) + self._stops.finish()
        return self.output.feed(tail) + self.output.finish()
