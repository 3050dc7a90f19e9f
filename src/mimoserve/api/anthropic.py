"""The Anthropic Messages door: POST /v1/messages and /anthropic/v1/messages (any query
string, e.g. Claude Code's `?beta=true`), and their `/count_tokens`.

`anthropic-version` and `anthropic-beta` headers are accepted and ignored (refusing an
unknown beta breaks Claude Code). Keys: `x-api-key`, `api-key` or Bearer, as everywhere.
Errors use Anthropic's body, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mimoserve.api.anthropic_in import to_chat_request
from mimoserve.api.anthropic_out import error_body, stream_frames, to_message
from mimoserve.api.auth import require_principal
from mimoserve.api.body import read_json_body
from mimoserve.api.chat import until_disconnect
from mimoserve.api.sse import EventStreamResponse, write_timeout
from mimoserve.chat.service import ChatService, PreparedChat
from mimoserve.errors import MimoError, StoreUnavailableError
from mimoserve.protocol.anthropic import CountTokensRequest, MessagesRequest
from mimoserve.store.base import StoreError
from mimoserve.streams import OwnedStream, with_heartbeat

API = "messages"
_STORE_DOWN = StoreUnavailableError("The store is unavailable; retry shortly.", retry_after_s=2)
_PING_INTERVAL_S = 5.0


def _error(exc: MimoError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=exc.headers)


async def _prepared(
    request: Request, model: type[MessagesRequest]
) -> tuple[PreparedChat, MessagesRequest]:
    principal = await require_principal(request)
    service: ChatService = request.app.state.chat
    body: MessagesRequest | None = None
    try:
        body, _ = await read_json_body(request, model, request.app.state.settings.max_body_bytes)
        chat = service.prepare(to_chat_request(body), principal, api=API, id_prefix="msg_")
    except MimoError as exc:
        service.record_refusal(principal, body.model if body else None, exc.status_code, API)
        raise
    return chat, body


async def create_message(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    try:
        chat, body = await _prepared(request, MessagesRequest)
        if not body.stream:
            answer = await until_disconnect(request, service.complete(chat))
            return JSONResponse(to_message(chat, answer))
        events = await until_disconnect(request, service.open_stream(chat))
    except MimoError as exc:
        return _error(exc)
    except StoreError:
        return _error(_STORE_DOWN)
    frames = stream_frames(chat, with_heartbeat(events, _PING_INTERVAL_S))
    return EventStreamResponse(OwnedStream(frames, events.aclose), write_timeout(request))


async def count_tokens(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    try:
        chat, _ = await _prepared(request, CountTokensRequest)
        return JSONResponse({"input_tokens": await service.count_tokens(chat)})
    except MimoError as exc:
        return _error(exc)
    except StoreError:
        return _error(_STORE_DOWN)


routes = [
    Route(f"{prefix}/v1/messages", create_message, methods=["POST"])
    for prefix in ("", "/anthropic")
] + [
    Route(f"{prefix}/v1/messages/count_tokens", count_tokens, methods=["POST"])
    for prefix in ("", "/anthropic")
]
