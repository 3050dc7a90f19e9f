"""Events -> Anthropic Messages: the whole message, the stream's events, the errors.

The stream follows Anthropic's order exactly: `message_start` (with the prompt's
`usage.input_tokens`, which Claude Code reads), then blocks one at a time, each opened
by `content_block_start`, filled by deltas and closed by `content_block_stop` before the
next opens (thinking blocks end with a `signature_delta`), then `message_delta` with the
stop reason and the output tokens, and `message_stop`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from mimoserve.api.sse import failure_after_start
from mimoserve.api.sse import named_frame as sse
from mimoserve.chat.answer import Answer
from mimoserve.chat.service import PreparedChat
from mimoserve.errors import ContextLengthExceededError, MimoError
from mimoserve.events import (
    ContentDelta,
    Finished,
    GenerationEvent,
    ReasoningDelta,
    Started,
    TokenUsage,
    ToolCallDelta,
    ToolCallEnded,
    ToolCallStarted,
)
from mimoserve.parsing.safe_json import loads_for_wire

# Thinking blocks carry a signature that clients send back; this server never checks it.
SIGNATURE = "mimoserve"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _usage(usage: TokenUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(finished: Finished, has_calls: bool) -> str:
    if finished.reason == "length":
        return "max_tokens"
    if has_calls:
        return "tool_use"
    return "stop_sequence" if finished.stop_sequence else "end_turn"


def _input(arguments: str) -> Any:
    value = loads_for_wire(arguments or "{}", fallback={})
    return value if isinstance(value, dict) else {}


def to_message(chat: PreparedChat, answer: Answer) -> dict[str, Any]:
    assert answer.finished is not None
    content: list[dict[str, Any]] = []
    if answer.reasoning:
        content.append(
            {"type": "thinking", "thinking": "".join(answer.reasoning), "signature": SIGNATURE}
        )
    text = "".join(answer.content)
    if text or not answer.calls:
        content.append({"type": "text", "text": text})
    for call in answer.calls:
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.id),
                "name": call.name,
                "input": _input(call.arguments),
            }
        )
    return {
        "id": chat.completion_id,
        "type": "message",
        "role": "assistant",
        "model": chat.model,
        "content": content,
        "stop_reason": stop_reason(answer.finished, bool(answer.calls)),
        "stop_sequence": answer.finished.stop_sequence,
        "usage": _usage(answer.usage),
    }


def error_body(error: MimoError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.status_code, "api_error")
    message = error.message
    if isinstance(error, ContextLengthExceededError):  # the wording Claude Code recognises
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.limit} maximum"
    return {"type": "error", "error": {"type": kind, "message": message}}


class _Blocks:
    """Which content block is open; opens and closes them in order."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None
        self.call: int | None = None

    def open(self, kind: str, block: dict[str, Any], call: int | None = None) -> list[bytes]:
        frames = self.close()
        self.index += 1
        self.kind, self.call = kind, call
        return [
            *frames,
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            ),
        ]

    def delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.index, "delta": delta},
        )

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        frames = []
        if self.kind == "thinking":
            frames.append(self.delta({"type": "signature_delta", "signature": SIGNATURE}))
        frames.append(
            sse("content_block_stop", {"type": "content_block_stop", "index": self.index})
        )
        self.kind = self.call = None
        return frames


def _event_frames(blocks: _Blocks, event: GenerationEvent) -> list[bytes]:
    if isinstance(event, ReasoningDelta):
        frames = (
            []
            if blocks.kind == "thinking"
            else blocks.open("thinking", {"type": "thinking", "thinking": ""})
        )
        return [*frames, blocks.delta({"type": "thinking_delta", "thinking": event.text})]
    if isinstance(event, ContentDelta):
        frames = [] if blocks.kind == "text" else blocks.open("text", {"type": "text", "text": ""})
        return [*frames, blocks.delta({"type": "text_delta", "text": event.text})]
    if isinstance(event, ToolCallStarted):
        block = {"type": "tool_use", "id": tool_use_id(event.id), "name": event.name, "input": {}}
        return blocks.open("tool_use", block, call=event.index)
    if isinstance(event, ToolCallDelta) and blocks.call == event.index:
        return [blocks.delta({"type": "input_json_delta", "partial_json": event.arguments})]
    if isinstance(event, ToolCallEnded) and blocks.call == event.index:
        return blocks.close()
    return []


async def stream_frames(
    chat: PreparedChat, events: AsyncIterator[GenerationEvent | None]
) -> AsyncGenerator[bytes, None]:
    """`None` in `events` is a heartbeat (nothing generated for a while): a `ping`."""
    blocks = _Blocks()
    has_calls = False
    try:
        async for event in events:
            if event is None:
                yield sse("ping", {"type": "ping"})
            elif isinstance(event, Started):
                message: dict[str, Any] = {
                    "id": chat.completion_id,
                    "type": "message",
                    "role": "assistant",
                    "model": chat.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": _usage(TokenUsage(event.prompt_tokens, 0, event.cached_tokens)),
                }
                yield sse("message_start", {"type": "message_start", "message": message})
                yield sse("ping", {"type": "ping"})
            elif isinstance(event, Finished):
                for frame in blocks.close():
                    yield frame
                delta = {
                    "stop_reason": stop_reason(event, has_calls),
                    "stop_sequence": event.stop_sequence,
                }
                yield sse(
                    "message_delta",
                    {"type": "message_delta", "delta": delta, "usage": _usage(event.usage)},
                )
                yield sse("message_stop", {"type": "message_stop"})
                return
            else:
                has_calls = has_calls or isinstance(event, ToolCallStarted)
                for frame in _event_frames(blocks, event):
                    yield frame
    except Exception as exc:
        yield sse("error", error_body(failure_after_start(exc)))
