"""A whole answer, assembled from the events: what a non-streaming reply is made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mimoserve.events import (
    AudioDelta,
    ContentDelta,
    Finished,
    GenerationEvent,
    HeardSegment,
    Logprobs,
    ReasoningDelta,
    TokenLogprob,
    TokenUsage,
    ToolCallDelta,
    ToolCallStarted,
)

AnswerFinish = Literal["stop", "length", "tool_calls", "content_filter"]


def answer_finish(finished: Finished, has_calls: bool) -> AnswerFinish:
    """An answer that ends normally with calls ends *for* the calls."""
    return "tool_calls" if has_calls and finished.reason == "stop" else finished.reason


@dataclass
class AnsweredCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Answer:
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    calls: list[AnsweredCall] = field(default_factory=list)
    finished: Finished | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)  # synthesised speech, in pieces
    transcript: list[str] = field(default_factory=list)  # what the speech says
    segments: list[HeardSegment] = field(default_factory=list)  # recognition, timed

    def add(self, event: GenerationEvent) -> None:
        if isinstance(event, Logprobs):
            self.logprobs.extend(event.tokens)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, AudioDelta):
            self.audio.append(event.data)
            self.transcript.append(event.transcript)
        elif isinstance(event, HeardSegment):
            self.segments.append(event)
        elif isinstance(event, ToolCallStarted):
            self.calls.append(AnsweredCall(event.id, event.name))
        elif isinstance(event, ToolCallDelta):
            self.calls[event.index].arguments += event.arguments
        elif isinstance(event, Finished):
            self.finished = event

    @property
    def finish_reason(self) -> AnswerFinish:
        assert self.finished is not None
        return answer_finish(self.finished, bool(self.calls))

    @property
    def usage(self) -> TokenUsage:
        assert self.finished is not None
        return self.finished.usage
