"""POST /v1/chat/completions: the OpenAI chat completions door."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.routing import Route

from mimoserve.api.door import Door, Translated, handler
from mimoserve.api.openai_chat import to_chunks, to_completion
from mimoserve.api.sse import sse_frames
from mimoserve.chat.answer import Answer
from mimoserve.chat.choices import IndexedEvent
from mimoserve.chat.service import PreparedChat
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.streams import OwnedStream


def _canonical(body: ChatCompletionRequest) -> Translated[None]:
    return Translated(body, None)  # this door's body is the canonical request


def _answer(chat: PreparedChat, _: None, answers: list[Answer]) -> object:
    return to_completion(chat, answers).model_dump(mode="json")


def _frames(chat: PreparedChat, _: None, events: AsyncIterator[IndexedEvent]) -> OwnedStream[bytes]:
    chunks = to_chunks(chat, events)  # type: ignore[arg-type]
    return sse_frames(OwnedStream(chunks, chunks.aclose))


CHAT_DOOR: Door[ChatCompletionRequest, None] = Door(
    api="chat.completions",
    id_prefix="chatcmpl-",
    body=ChatCompletionRequest,
    translate=_canonical,
    answer=_answer,
    frames=_frames,
    choices=True,
    pass_raw=True,
    audio_bodies=True,
)

# A plain Starlette route, not a FastAPI one: FastAPI's per-request dependency solving
# and response handling were a tenth of a relayed request's CPU (py-spy), and this
# endpoint reads its own body and builds its own responses anyway.
routes = [Route("/v1/chat/completions", handler(CHAT_DOOR), methods=["POST"])]
