"""The OpenAI Responses door: POST /v1/responses (stateless; what Codex speaks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.routing import Route

from mimoserve.api.door import Door, Translated, handler
from mimoserve.api.responses_in import Translation, to_chat_request
from mimoserve.api.responses_out import ResponseShape, stream_frames, to_response
from mimoserve.chat.answer import Answer
from mimoserve.chat.service import PreparedChat
from mimoserve.events import GenerationEvent
from mimoserve.protocol.responses import ResponsesRequest


def _translate(body: ResponsesRequest) -> Translated[Translation]:
    translation = to_chat_request(body)
    return Translated(translation.request, translation)


def _answer(chat: PreparedChat, translation: Translation, answers: list[Answer]) -> Any:
    return to_response(ResponseShape(chat, translation), answers[0])


def _frames(
    chat: PreparedChat, translation: Translation, events: AsyncIterator[GenerationEvent]
) -> AsyncIterator[bytes]:
    return stream_frames(ResponseShape(chat, translation), events)


RESPONSES_DOOR: Door[ResponsesRequest, Translation] = Door(
    api="responses",
    id_prefix="resp_",
    body=ResponsesRequest,
    translate=_translate,
    answer=_answer,
    frames=_frames,
    # Its clients sent `text.format` where the canonical request says `response_format`.
    params={"response_format": "text.format"},
)

routes = [Route("/v1/responses", handler(RESPONSES_DOOR), methods=["POST"])]
