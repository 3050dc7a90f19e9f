"""What a request reserves against token limits before its real usage is known."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mimoserve.limits.policy import Limits
from mimoserve.protocol.chat import ChatCompletionRequest

# Prompt tokens are counted only once the engine tokenizes; until then, a character
# estimate (English averages about four characters a token; three errs high).
_CHARS_PER_TOKEN = 3


@dataclass(frozen=True)
class AdmissionPolicy:
    defaults: Limits = field(default_factory=Limits)
    completion_reserve: int = 512  # when a request sets no max_completion_tokens


def estimate_prompt_tokens(request: ChatCompletionRequest, raw: bytes | None = None) -> int:
    """Until an engine counts them: from the body's size (the raw body when at hand,
    measuring it costs nothing; else the messages and tools)."""
    size = (
        len(raw) if raw is not None else len(request.model_dump_json(include={"messages", "tools"}))
    )
    return math.ceil(size / _CHARS_PER_TOKEN)


def requested_output(request: ChatCompletionRequest) -> int | None:
    """The client's own cap on completion tokens per choice, if it set one."""
    return request.max_completion_tokens or request.max_tokens


def completion_budget(
    request: ChatCompletionRequest, completion_reserve: int, context_length: int
) -> int:
    """The completion tokens per choice rate limits reserve: the client's cap or the
    policy's default, never more than a context window holds (a `max_tokens` of 400
    digits is a number no engine can reach)."""
    return min(requested_output(request) or completion_reserve, context_length)
