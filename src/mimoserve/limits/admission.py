"""What a request reserves against token limits before its real usage is known."""

from __future__ import annotations

from dataclasses import dataclass, field

from mimoserve.limits.policy import Limits
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.estimate import estimate_prompt_tokens

__all__ = ["AdmissionPolicy", "completion_budget", "estimate_prompt_tokens", "requested_output"]


@dataclass(frozen=True)
class AdmissionPolicy:
    defaults: Limits = field(default_factory=Limits)
    completion_reserve: int = 512  # when a request sets no max_completion_tokens


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
