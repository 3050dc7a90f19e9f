"""One usage record per request, and what makes its strings safe for any database."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

_MAX_TEXT = 256


@dataclass(frozen=True)
class UsageRecord:
    key_id: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    finish_reason: str | None = None
    created_at: float = field(default_factory=time.time)
    account_id: str = "default"
    request_id: str = ""  # the completion id the client saw (empty for refusals)
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # unique per record
    api: str = "chat.completions"  # the front door: chat.completions, messages, responses
    http_request_id: str = ""  # the x-request-id of the HTTP request
    cost_micros: int = 0  # millionths of the registry's currency (billing/prices.py)
    # "engine": the engine counted the tokens; "estimate": it did not (a relayed stream
    # cut short before the engine's usage, an engine that sends none), the server did.
    usage_source: str = "engine"
    # Speculative decoding: tokens guessed and verified, and those the sampler chose.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    # Speech: seconds of audio heard (recognition) or spoken (synthesis), characters spoken.
    audio_seconds: float = 0.0
    characters: int = 0


def safe_text(text: str) -> str:
    """Text every database stores: PostgreSQL refuses NUL characters and both refuse
    lone surrogates (valid in a JSON string, not in UTF-8); long text is cut."""
    text = text[:_MAX_TEXT]
    if text.isprintable() and text.isascii():
        return text  # the common case, checked in C
    text = text.replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def sanitized(record: UsageRecord) -> UsageRecord:
    """The record with every string field made safe (clients choose some of them)."""
    changes: dict[str, Any] = {
        f.name: safe
        for f in dataclasses.fields(record)
        if isinstance(value := getattr(record, f.name), str) and (safe := safe_text(value)) != value
    }
    return dataclasses.replace(record, **changes) if changes else record
