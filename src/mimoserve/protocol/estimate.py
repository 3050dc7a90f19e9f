"""A request's prompt tokens before any engine has counted them (admission, budgets,
and engines that count only in their answer)."""

from __future__ import annotations

import math

from mimoserve.protocol.chat import ChatCompletionRequest

# Prompt tokens are counted only once the engine tokenizes; until then, a character
# estimate (English averages about four characters a token; three errs high).
_CHARS_PER_TOKEN = 3


def estimate_prompt_tokens(request: ChatCompletionRequest, raw: bytes | None = None) -> int:
    """Until an engine counts them: from the body's size (the raw body when at hand,
    measuring it costs nothing; else the messages and tools)."""
    size = (
        len(raw) if raw is not None else len(request.model_dump_json(include={"messages", "tools"}))
    )
    return math.ceil(size / _CHARS_PER_TOKEN)
