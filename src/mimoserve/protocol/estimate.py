"""A request's prompt tokens before any engine has counted them (admission, budgets,
and engines that count only in their answer)."""

from __future__ import annotations

import math

from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.messages import AudioPart

# Prompt tokens are counted only once the engine tokenizes; until then, a character
# estimate (English averages about four characters a token; three errs high).
_CHARS_PER_TOKEN = 3
# Audio is counted by its length (6.25 tokens a second), unknown until decoded; bounded
# from its base64 size at the bitrate of compact speech (32 kbit/s: 5,333 base64
# characters a second), so an mp3 is not read as hundreds of thousands of text tokens.
_AUDIO_BASE64_CHARS_PER_TOKEN = 853


def estimate_prompt_tokens(request: ChatCompletionRequest, raw: bytes | None = None) -> int:
    """Until an engine counts them: from the body's size (the raw body when at hand,
    measuring it costs nothing; else the messages and tools)."""
    size = (
        len(raw) if raw is not None else len(request.model_dump_json(include={"messages", "tools"}))
    )
    audio = inline_audio_chars(request)
    return math.ceil(max(size - audio, 0) / _CHARS_PER_TOKEN) + math.ceil(
        audio / _AUDIO_BASE64_CHARS_PER_TOKEN
    )


def inline_audio_chars(request: ChatCompletionRequest) -> int:
    """Characters of the body that are `input_audio` data."""
    return sum(
        len(part.input_audio.data)
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, AudioPart)
    )
