"""The OpenAI Responses door: POST /v1/responses (stateless; what Codex speaks)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mimoserve.api.auth import require_principal
from mimoserve.api.body import read_json_body
from mimoserve.api.chat import until_disconnect
from mimoserve.api.responses_in import to_chat_request
from mimoserve.api.responses_out import ResponseShape, stream_frames, to_response
from mimoserve.api.sse import EventStreamResponse, write_timeout
from mimoserve.chat.service import ChatService
from mimoserve.errors import MimoError
from mimoserve.protocol.responses import ResponsesRequest
from mimoserve.streams import OwnedStream

API = "responses"


def _in_this_doors_words(error: MimoError) -> MimoError:
    """The engine names the canonical request's fields; this door's client sent
    `text.format` where the canonical request says `response_format`."""
    if error.param == "response_format":
        error.param = "text.format"
        error.message = error.message.replace("response_format", "text.format", 1)
        error.args = (error.message,)
    return error


async def create_response(request: Request) -> Response:
    principal = await require_principal(request)
    service: ChatService = request.app.state.chat
    body: ResponsesRequest | None = None
    try:
        body, _ = await read_json_body(
            request, ResponsesRequest, request.app.state.settings.max_body_bytes
        )
        translation = to_chat_request(body)
        chat = service.prepare(translation.request, principal, api=API, id_prefix="resp_")
    except MimoError as exc:
        service.record_refusal(principal, body.model if body else None, exc.status_code, API)
        raise
    shape = ResponseShape(chat, translation)
    try:
        if not body.stream:
            answer = await until_disconnect(request, service.complete(chat))
            return JSONResponse(to_response(shape, answer))
        events = await until_disconnect(request, service.open_stream(chat))
    except MimoError as exc:
        raise _in_this_doors_words(exc) from None
    frames = OwnedStream(stream_frames(shape, events), events.aclose)
    return EventStreamResponse(frames, write_timeout(request))


routes = [Route("/v1/responses", create_response, methods=["POST"])]
