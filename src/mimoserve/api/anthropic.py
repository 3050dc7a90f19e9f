"""The Anthropic Messages door: POST /v1/messages and /anthropic/v1/messages (any query
string, e.g. Claude Code's `?beta=true`), and their `/count_tokens`.

`anthropic-version` and `anthropic-beta` headers are accepted and ignored (refusing an
unknown beta breaks Claude Code). Keys: `x-api-key`, `api-key` or Bearer, as everywhere.
Errors use Anthropic's body, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mimoserve.api.anthropic_in import to_chat_request
from mimoserve.api.anthropic_out import error_body, stream_frames, to_message
from mimoserve.api.door import Door, Translated, handler, prepared
from mimoserve.chat.answer import Answer
from mimoserve.chat.service import ChatService, PreparedChat
from mimoserve.events import GenerationEvent
from mimoserve.protocol.anthropic import CountTokensRequest, MessagesRequest

# Claude Code drops a stream that sends nothing for a while: a `ping` every 5 s while a
# long prompt is read.
_PING_INTERVAL_S = 5.0


def _translate(body: MessagesRequest) -> Translated[None]:
    return Translated(to_chat_request(body), None)


def _answer(chat: PreparedChat, _: None, answers: list[Answer]) -> Any:
    return to_message(chat, answers[0])


def _frames(
    chat: PreparedChat, _: None, events: AsyncIterator[GenerationEvent | None]
) -> AsyncIterator[bytes]:
    return stream_frames(chat, events)


MESSAGES_DOOR: Door[MessagesRequest, None] = Door(
    api="messages",
    id_prefix="msg_",
    body=MessagesRequest,
    translate=_translate,
    answer=_answer,
    frames=_frames,
    error_body=error_body,
    heartbeat_s=_PING_INTERVAL_S,
)
# count_tokens: the same body (less the generation fields), the same checks and errors.
COUNT_DOOR: Door[CountTokensRequest, None] = Door(
    api="messages", id_prefix="msg_", body=CountTokensRequest, translate=_translate,
    answer=_answer, frames=_frames, error_body=error_body,
)  # fmt: skip


async def _count_tokens(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    chat, _, _ = await prepared(COUNT_DOOR, request)
    return JSONResponse({"input_tokens": await service.count_tokens(chat)})


routes = [
    Route(f"{prefix}/v1/messages", handler(MESSAGES_DOOR), methods=["POST"])
    for prefix in ("", "/anthropic")
] + [
    Route(f"{prefix}/v1/messages/count_tokens", handler(COUNT_DOOR, _count_tokens),
          methods=["POST"])
    for prefix in ("", "/anthropic")
]  # fmt: skip
