"""One handler for every front door.

A door is described, not written: its request model, how its body becomes the canonical
chat request, how an answer and a stream's events become its wire format, its error
body. `handler(door)` runs the steps every door shares: principal -> body -> translate
-> prepare (a refusal is recorded) -> complete, or open the stream (a client that leaves
while waiting gives up its place) -> the door's answer or frames. Adding a door is one
`Door` and its two translators.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mimoserve.api.auth import require_principal
from mimoserve.api.body import read_json_body
from mimoserve.api.disconnect import until_disconnect
from mimoserve.api.errors import store_unavailable
from mimoserve.api.sse import EventStreamResponse, write_timeout
from mimoserve.auth.keys import Principal
from mimoserve.chat.answer import Answer
from mimoserve.chat.choices import IndexedEvent
from mimoserve.chat.service import ChatService, PreparedChat
from mimoserve.errors import MimoError, PayloadTooLargeError
from mimoserve.events import GenerationEvent
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.estimate import inline_audio_chars
from mimoserve.store.base import StoreError
from mimoserve.streams import ClosableStream, OwnedStream, with_heartbeat

Body = TypeVar("Body", bound=BaseModel)
Context = TypeVar("Context")


@dataclass(frozen=True)
class Translated(Generic[Context]):
    """A door's body as the canonical request, and what the door keeps to answer it."""

    request: ChatCompletionRequest
    context: Context


@dataclass(frozen=True)
class Door(Generic[Body, Context]):
    api: str  # recorded with the usage: chat.completions, messages, responses
    id_prefix: str  # of the ids the door's answers carry
    body: type[Body]
    translate: Callable[[Body], Translated[Context]]
    # The whole answer (all choices; doors without `n` read the first).
    answer: Callable[[PreparedChat, Context, list[Answer]], Any]
    # The stream's frames from its events (or None: nothing came for a heartbeat's while).
    frames: Callable[[PreparedChat, Context, AsyncIterator[Any]], AsyncIterator[bytes]]
    # The error body; None: the contract's (the app's exception handlers).
    error_body: Callable[[MimoError], dict[str, Any]] | None = None
    heartbeat_s: float | None = None  # frames see None after this long without an event
    choices: bool = False  # the door speaks `n`: frames get (index, event) pairs
    pass_raw: bool = False  # the body as sent goes to an upstream engine that speaks it
    # Bodies may carry inline audio past max_body_bytes (up to max_audio_body_bytes).
    audio_bodies: bool = False
    # Canonical field names in errors -> the names this door's clients sent.
    params: Mapping[str, str] = field(default_factory=dict)


def handler(
    door: Door[Any, Any], run: Callable[[Request], Awaitable[Response]] | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """The door's route handler: `run` (by default: generate an answer or a stream), its
    errors in the door's body and words."""

    async def handle(request: Request) -> Response:
        try:
            if run is not None:
                return await run(request)
            return await _handle(door, request)
        except StoreError as exc:
            if door.error_body is None:
                raise  # the app's handler answers 503 in the contract's body
            return _error(door, store_unavailable(exc))
        except MimoError as exc:
            error = in_doors_words(door, exc)
            if door.error_body is None:
                raise error from None
            return _error(door, error)

    return handle


def _error(door: Door[Any, Any], error: MimoError) -> JSONResponse:
    assert door.error_body is not None
    return JSONResponse(door.error_body(error), status_code=error.status_code,
                        headers=error.headers)  # fmt: skip


async def _handle(door: Door[Any, Any], request: Request) -> Response:
    service: ChatService = request.app.state.chat
    chat, translated, streamed = await prepared(door, request)
    if not streamed:
        answers = await until_disconnect(request, service.complete_choices(chat))
        return JSONResponse(door.answer(chat, translated.context, answers))
    events = await until_disconnect(request, service.open_choices(chat))
    stream: AsyncIterator[Any] = events if door.choices else _one_choice(events)
    if door.heartbeat_s is not None:
        stream = with_heartbeat(stream, door.heartbeat_s)  # type: ignore[arg-type]
    frames = door.frames(chat, translated.context, stream)
    return EventStreamResponse(OwnedStream(frames, events.aclose), write_timeout(request))  # type: ignore[arg-type]


async def prepared(
    door: Door[Any, Context], request: Request
) -> tuple[PreparedChat, Translated[Context], bool]:
    """The request, checked and bound to its backend, with whether it streams. A refusal
    is recorded in the ledger (with the model, when the body named one)."""
    principal: Principal = await require_principal(request)
    body: BaseModel | None = None
    try:
        settings = request.app.state.settings
        audio_limit = settings.max_audio_body_bytes if door.audio_bodies else None
        body, raw = await read_json_body(request, door.body, settings.max_body_bytes,
                                         audio_limit=audio_limit)  # fmt: skip
        translated = door.translate(body)
        if len(raw) - inline_audio_chars(translated.request) > settings.max_body_bytes:
            raise PayloadTooLargeError(
                f"Request body is larger than the limit of {settings.max_body_bytes} bytes "
                "(inline audio aside)."
            )
    except MimoError as exc:
        model = getattr(body, "model", None) if body is not None else None
        request.app.state.chat.record_refusal(principal, model, exc.status_code, door.api)
        raise
    chat = bound(door, request, principal, translated.request, raw if door.pass_raw else None)
    return chat, translated, bool(getattr(body, "stream", False))


def bound(
    door: Door[Any, Any], request: Request, principal: Principal,
    canonical: ChatCompletionRequest, raw: bytes | None = None,
) -> PreparedChat:  # fmt: skip
    """The canonical request checked and bound to its backend; a refusal is recorded."""
    service: ChatService = request.app.state.chat
    try:
        return service.prepare(canonical, principal, raw, api=door.api, id_prefix=door.id_prefix)
    except MimoError as exc:
        service.record_refusal(principal, canonical.model, exc.status_code, door.api)
        raise


def in_doors_words(door: Door[Any, Any], error: MimoError) -> MimoError:
    """The engine names the canonical request's fields; a door's client may have sent
    them under other names (Responses' `text.format` for `response_format`)."""
    renamed = door.params.get(error.param or "")
    if renamed is not None:
        old, error.param = error.param or "", renamed
        error.message = error.message.replace(old, renamed, 1)
        error.args = (error.message,)
    return error


async def _one_choice(
    events: ClosableStream[IndexedEvent],
) -> AsyncGenerator[GenerationEvent, None]:
    """The events of a door without `n` (its request always has one choice)."""
    async for _, event in events:
        yield event
