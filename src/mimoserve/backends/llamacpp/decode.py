"""The synchronous decode loop of one request, run on the engine's worker thread."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from llama_cpp import LogitsProcessorList

from mimoserve.backends.base import (
    Finished,
    FinishReason,
    GenerationEvent,
    SamplingParams,
    TextDelta,
    TokenUsage,
)
from mimoserve.backends.llamacpp.model import LoadedModel
from mimoserve.parsing.stop import StopMatcher
from mimoserve.parsing.utf8 import Utf8Stream

log = logging.getLogger(__name__)

Emit = Callable[[GenerationEvent | BaseException], None]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What the engine writes when the reasoning budget is spent.
FORCED_CLOSE = "\n</think>\n\n"


@dataclass(eq=False)  # identity semantics: jobs live in a set of running work
class DecodeJob:
    prompt: list[int]
    sampling: SamplingParams
    grammar: Any = None  # a LlamaGrammar, or None for free text
    # Reasoning: already inside <think> when the prompt opened it; closed at the budget.
    in_think: bool = False
    think_budget: int | None = None
    # Set by the requester when its client goes away; checked before every token.
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

    def force_close(self) -> None:
        self.active = False
        self.closed = True
        self._tail = ""

    @property
    def answer_pending(self) -> bool:
        """Reasoning is over but no answer has been written yet."""
        return self.closed and not self.active and not self.answered


def _answer_required(model: LoadedModel, reasoning: ReasoningTracker) -> Any:
    """A logits processor that forbids ending the turn between `</think>` and the answer.

    Small models often close the think block and stop, leaving an empty answer; the
    prompted-thinking contract is reasoning *and* an answer.
    """
    end_tokens = model.end_tokens

    def forbid_end(_input_ids: Any, scores: Any) -> Any:
        if reasoning.answer_pending:
            scores[end_tokens] = -float("inf")
        return scores

    return LogitsProcessorList([forbid_end])


def _token_stream(
    model: LoadedModel, job: DecodeJob, tokens: list[int], processors: Any = None
) -> Generator[int, None, None]:
    sampling = job.sampling
    # top_k and min_p are off: the API's sampling is temperature and top_p only, as in OpenAI's.
    return model.llm.generate(  # type: ignore[no-any-return]
        tokens,
        top_k=0,
        top_p=sampling.top_p,
        min_p=0.0,
        temp=sampling.temperature,
        repeat_penalty=1.0,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        grammar=job.grammar,
        logits_processor=processors,
    )


def run_decode(model: LoadedModel, job: DecodeJob, emit: Emit) -> None:
    """Emits text deltas and one `Finished`, or nothing more once cancelled.

    A think block the model leaves open (it tries to end its turn inside it, or spends
    the reasoning budget) is closed by the engine writing `</think>`; generation then
    resumes from the extended text, reusing the KV cache for everything before it.
    """
    if job.cancelled.is_set():
        return
    sampling = job.sampling
    room = model.n_ctx - len(job.prompt)
    limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
    cached = model.cached_prefix(job.prompt)
    model.llm.set_seed(sampling.seed if sampling.seed is not None else secrets.randbits(31))
    utf8 = Utf8Stream()
    stops = StopMatcher(sampling.stop)
    reasoning = ReasoningTracker(job.in_think, job.think_budget)
    forced_close = model.tokenize_text(FORCED_CLOSE)
    history = list(job.prompt)
    processors = _answer_required(model, reasoning) if job.in_think else None
    completion_tokens = 0
    reason: FinishReason = "length"
    tokens = _token_stream(model, job, history, processors)
    try:
        while True:
            token = next(tokens)
            if job.cancelled.is_set():
                log.info("generation cancelled after %d tokens", completion_tokens)
                return
            completion_tokens += 1
            ended = model.is_end_of_generation(token)
            text = ""
            if not ended:
                history.append(token)
                piece = utf8.feed(model.token_bytes(token))
                reasoning.observe(piece)
                text = stops.feed(piece)
                if stops.stopped or completion_tokens >= limit:
                    reason = "stop" if stops.stopped else "length"
                    if text:
                        emit(TextDelta(text))
                    break
            must_close = reasoning.active and (ended or reasoning.over_budget)
            if must_close and completion_tokens + len(forced_close) < limit:
                history += forced_close
                completion_tokens += len(forced_close)
                reasoning.force_close()
                text += stops.feed(FORCED_CLOSE)
                tokens.close()
                tokens = _token_stream(model, job, history, processors)
            elif ended:
                reason = "stop"
                break
            if text:
                emit(TextDelta(text))
    finally:
        tokens.close()
    tail = stops.feed(utf8.finish()) + stops.finish()
    if tail:
        emit(TextDelta(tail))
    usage = TokenUsage(len(job.prompt), completion_tokens, cached, reasoning.tokens)
    emit(Finished(reason, usage))
