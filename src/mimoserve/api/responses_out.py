"""Events -> OpenAI Responses: the response object, its stream, in Responses' order.

Each output item (reasoning, message, function call) is announced with
`response.output_item.added`, filled by its deltas, and closed with its `.done` events
and `response.output_item.done` (Codex reads calls from there) before the next opens;
every stream ends with `response.completed`, `response.incomplete` (the output limit)
or `response.failed`. Every event carries a `sequence_number`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from mimoserve.api.responses_in import Translation
from mimoserve.api.sse import failure_after_start
from mimoserve.api.sse import named_frame as sse
from mimoserve.chat.answer import Answer
from mimoserve.chat.service import PreparedChat
from mimoserve.events import (
    ContentDelta,
    Finished,
    GenerationEvent,
    ReasoningDelta,
    TokenUsage,
    ToolCallDelta,
    ToolCallEnded,
    ToolCallStarted,
)
from mimoserve.parsing.safe_json import loads_for_wire


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(usage: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseShape:
    """The response object's fields that do not depend on the answer."""

    def __init__(self, chat: PreparedChat, translation: Translation) -> None:
        request = translation.request
        self.chat, self.custom = chat, translation.custom_tools
        self.base: dict[str, Any] = {
            "id": chat.completion_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": chat.model,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": request.max_completion_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "metadata": {},
            "previous_response_id": None,
            "store": False,
            "truncation": "disabled",
            "text": {"format": {"type": "text"}},
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        finished: Finished | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {**self.base, "status": status, "output": output, "error": error}
        if finished is not None:
            body["usage"] = _usage(finished.usage)
            if finished.reason == "length":
                body["status"] = "incomplete"
                body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def call_item(self, item_id: str, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        if name in self.custom:  # a custom tool (Codex's apply_patch): its one string input
            decoded = loads_for_wire(arguments or "{}", fallback={})
            value = decoded.get("input", "") if isinstance(decoded, dict) else ""
            return {
                "type": "custom_tool_call",
                "id": item_id,
                "call_id": call_id,
                "name": name,
                "input": value if isinstance(value, str) else json.dumps(value),
                "status": "completed",
            }
        return {
            "type": "function_call",
            "id": item_id,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": "completed",
        }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if status == "completed":
        content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def to_response(shape: ResponseShape, answer: Answer) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if answer.reasoning:
        output.append(reasoning_item(_id("rs"), "".join(answer.reasoning)))
    text = "".join(answer.content)
    if text or not answer.calls:
        output.append(message_item(_id("msg"), text))
    for call in answer.calls:
        output.append(shape.call_item(_id("fc"), call.id, call.name, call.arguments))
    return shape.response("completed", output, answer.finished)


class _Items:
    """The open output item; every event it writes gets the next sequence number."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.sequence = 0
        self.done: list[dict[str, Any]] = []
        self.kind: str | None = None
        self.item_id = ""
        self.text = ""
        self.call: tuple[int, str, str] | None = None  # (index, call id, name)

    def event(self, kind: str, **data: Any) -> bytes:
        frame = sse(kind, {"type": kind, "sequence_number": self.sequence, **data})
        self.sequence += 1
        return frame

    @property
    def index(self) -> int:
        return len(self.done)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": self.index}

    def open(self, kind: str, item: dict[str, Any], part: dict[str, Any] | None) -> list[bytes]:
        frames = self.close()
        self.kind, self.item_id, self.text = kind, item["id"], ""
        frames.append(self.event("response.output_item.added", output_index=self.index, item=item))
        if part is not None:
            frames.append(
                self.event(
                    "response.content_part.added", **self._where(), content_index=0, part=part
                )
            )
        return frames

    def delta(self, kind: str, text: str, **extra: Any) -> bytes:
        self.text += text
        return self.event(kind, **self._where(), delta=text, **extra)

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        where, text = self._where(), self.text
        if self.kind == "reasoning":
            item = reasoning_item(self.item_id, text)
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            frames = [
                self.event("response.reasoning_text.done", **where, content_index=0, text=text),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        elif self.kind == "message":
            item = message_item(self.item_id, text)
            part = {"type": "output_text", "text": text, "annotations": []}
            frames = [
                self.event("response.output_text.done", **where, content_index=0, text=text),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        else:
            assert self.call is not None
            _, call_id, name = self.call
            item = self.shape.call_item(self.item_id, call_id, name, text)
            frames = [self.event("response.function_call_arguments.done", **where, arguments=text)]
        frames.append(self.event("response.output_item.done", output_index=self.index, item=item))
        self.done.append(item)
        self.kind, self.call = None, None
        return frames


def _frames(items: _Items, event: GenerationEvent) -> list[bytes]:
    if isinstance(event, ReasoningDelta):
        frames = (
            []
            if items.kind == "reasoning"
            else items.open(
                "reasoning",
                {"type": "reasoning", "id": _id("rs"), "summary": [], "content": []},
                {"type": "reasoning_text", "text": ""},
            )
        )
        return [*frames, items.delta("response.reasoning_text.delta", event.text, content_index=0)]
    if isinstance(event, ContentDelta):
        frames = (
            []
            if items.kind == "message"
            else items.open(
                "message",
                message_item(_id("msg"), "", "in_progress"),
                {"type": "output_text", "text": "", "annotations": []},
            )
        )
        return [*frames, items.delta("response.output_text.delta", event.text, content_index=0)]
    if isinstance(event, ToolCallStarted):
        item = {
            "type": "function_call",
            "id": _id("fc"),
            "call_id": event.id,
            "name": event.name,
            "arguments": "",
            "status": "in_progress",
        }
        frames = items.open("call", item, None)
        items.call = (event.index, event.id, event.name)
        return frames
    if isinstance(event, ToolCallDelta) and items.call and items.call[0] == event.index:
        return [items.delta("response.function_call_arguments.delta", event.arguments)]
    if isinstance(event, ToolCallEnded) and items.call and items.call[0] == event.index:
        return items.close()
    return []


async def stream_frames(
    shape: ResponseShape, events: AsyncIterator[GenerationEvent]
) -> AsyncGenerator[bytes, None]:
    items = _Items(shape)
    yield items.event("response.created", response=shape.response("in_progress", [], None))
    yield items.event("response.in_progress", response=shape.response("in_progress", [], None))
    try:
        async for event in events:
            if isinstance(event, Finished):
                for frame in items.close():
                    yield frame
                body = shape.response("completed", items.done, event)
                final = (
                    "response.incomplete"
                    if body["status"] == "incomplete"
                    else "response.completed"
                )
                yield items.event(final, response=body)
                return
            for frame in _frames(items, event):
                yield frame
    except Exception as exc:
        failure = failure_after_start(exc)
        error = {"code": failure.code, "message": failure.message}
        failed = shape.response("failed", items.done, None, error)
        yield items.event("response.failed", response=failed)
