"""POST /v1/chat/completions: the OpenAI chat completions door."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mimoserve.api.auth import require_principal
from mimoserve.api.body import read_json_body
from mimoserve.api.openai_chat import to_chunks, to_completion
from mimoserve.api.sse import EventStreamResponse, sse_frames, write_timeout
from mimoserve.chat.service import ChatService
from mimoserve.errors import ClientDisconnected, MimoError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.streams import OwnedStream

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.1


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it as soon as the client goes away.

    If `work` finished just as the client left, its result is not handed on: a stream
    it opened is closed here, so what the stream holds (admission, slot) is released.
    """
    task = asyncio.ensure_future(work)
    handed_on = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                result = task.result()
                handed_on = True
                return result
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif (
            not handed_on
            and not task.cancelled()
            and task.exception() is None
            and isinstance(stream := task.result(), OwnedStream)
        ):
            await stream.aclose()


async def create_chat_completion(request: Request) -> Response:
    principal = await require_principal(request)
    service: ChatService = request.app.state.chat
    body: ChatCompletionRequest | None = None
    try:
        body, raw = await read_json_body(
            request, ChatCompletionRequest, request.app.state.settings.max_body_bytes
        )
        chat = service.prepare(body, principal, raw)
    except MimoError as exc:
        service.record_refusal(principal, body.model if body else None, exc.status_code)
        raise
    if body.stream:
        # Waiting for the engine to take the request can mean waiting for a free slot: a
        # client that leaves meanwhile gives up its place in the queue.
        events = await until_disconnect(request, service.open_choices(chat))
        frames = sse_frames(OwnedStream(to_chunks(chat, events), events.aclose))
        return EventStreamResponse(frames, write_timeout(request))
    answers = await until_disconnect(request, service.complete_choices(chat))
    return JSONResponse(to_completion(chat, answers).model_dump(mode="json"))


# A plain Starlette route, not a FastAPI one: FastAPI's per-request dependency solving
# and response handling were a tenth of a relayed request's CPU (py-spy), and this
# endpoint reads its own body and builds its own responses anyway.
routes = [Route("/v1/chat/completions", create_chat_completion, methods=["POST"])]
