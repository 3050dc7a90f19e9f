"""The synchronous decode loop of one request, run on the engine's worker thread."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from mimoserve.backends.base import (
    Finished,
    FinishReason,
    GenerationEvent,
    OutputConstraint,
    SamplingParams,
    TextDelta,
    TokenUsage,
)
from mimoserve.backends.llamacpp.model import LoadedModel
from mimoserve.parsing.stop import StopMatcher
from mimoserve.parsing.utf8 import Utf8Stream

log = logging.getLogger(__name__)

Emit = Callable[[GenerationEvent | BaseException], None]


@dataclass(eq=False)  # identity semantics: jobs live in a set of running work
class DecodeJob:
    prompt: list[int]
    sampling: SamplingParams
    constraint: OutputConstraint | None
    # Set by the requester when its client goes away; checked before every token.
    cancelled: threading.Event = field(default_factory=threading.Event)


def _grammar(constraint: OutputConstraint | None) -> Any:
    if constraint is None:
        return None
    if constraint.schema is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return LlamaGrammar.from_json_schema(json.dumps(constraint.schema), verbose=False)


def run_decode(model: LoadedModel, job: DecodeJob, emit: Emit) -> None:
    """Emits text deltas and one `Finished`, or nothing more once cancelled."""
    if job.cancelled.is_set():
        return
    sampling = job.sampling
    room = model.n_ctx - len(job.prompt)
    limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
    cached = model.cached_prefix(job.prompt)
    model.llm.set_seed(sampling.seed if sampling.seed is not None else secrets.randbits(31))
    utf8 = Utf8Stream()
    stops = StopMatcher(sampling.stop)
    completion_tokens = 0
    reason: FinishReason = "length"
    # top_k and min_p are off: the API's sampling is temperature and top_p only, as in OpenAI's.
    tokens = model.llm.generate(
        job.prompt,
        top_k=0,
        top_p=sampling.top_p,
        min_p=0.0,
        temp=sampling.temperature,
        repeat_penalty=1.0,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        grammar=_grammar(job.constraint),
    )
    try:
        for token in tokens:
            if job.cancelled.is_set():
                log.info("generation cancelled after %d tokens", completion_tokens)
                return
            completion_tokens += 1
            if model.is_end_of_generation(token):
                reason = "stop"
                break
            text = stops.feed(utf8.feed(model.token_bytes(token)))
            if text:
                emit(TextDelta(text))
            if stops.stopped:
                reason = "stop"
                break
            if completion_tokens >= limit:
                break
    finally:
        tokens.close()
    tail = stops.feed(utf8.finish()) + stops.finish()
    if tail:
        emit(TextDelta(tail))
    emit(Finished(reason, TokenUsage(len(job.prompt), completion_tokens, cached)))
