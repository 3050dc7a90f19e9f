"""OpenAI's audio endpoints, as doors onto the same core as chat completions.

`/v1/audio/speech` becomes a streamed synthesis request (the assistant message is the
input, a user message the instructions) and answers the audio bytes as they come.
`/v1/audio/transcriptions` reads its multipart form into a recognition request (the
file as an `input_audio` part, the prompt as a text part) and answers json, text,
verbose_json, srt or vtt. Keys, limits, budgets and the ledger apply as to any request.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mimoserve.api.auth import require_principal
from mimoserve.api.body import read_body, validation_message
from mimoserve.api.disconnect import until_disconnect
from mimoserve.api.door import Door, Translated, bound, handler, prepared
from mimoserve.api.sse import EventStreamResponse, frame, write_timeout
from mimoserve.chat.answer import Answer
from mimoserve.chat.service import ChatService, PreparedChat
from mimoserve.errors import InvalidRequestError, MimoError
from mimoserve.events import AudioDelta, Finished, HeardSegment
from mimoserve.protocol.audio import (
    SpeechRequest,
    TranscriptFormat,
    Transcription,
    TranscriptionUsage,
    TranscriptSegment,
    VerboseTranscription,
)
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.streams import OwnedStream

_MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "pcm16": "audio/pcm"}
_SPEECH_FORMATS = {"mp3": "mp3", "wav": "wav", "pcm": "pcm16"}


def _speech_request(body: SpeechRequest) -> Translated[tuple[str, str]]:
    fmt = _SPEECH_FORMATS.get(body.response_format)
    if fmt is None:
        raise InvalidRequestError(
            f"response_format: {body.response_format!r} is not produced here; use mp3, wav "
            "or pcm (16-bit mono at 24 kHz).", param="response_format",
        )  # fmt: skip
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "user", "content": body.instructions})
    messages.append({"role": "assistant", "content": body.input})
    canonical = ChatCompletionRequest.model_validate({
        "model": body.model, "messages": messages, "stream": True,
        "audio": {"format": fmt, "voice": body.voice, "speed": body.speed},
    })  # fmt: skip
    return Translated(canonical, (fmt, body.stream_format))


SPEECH_DOOR: Door[SpeechRequest, tuple[str, str]] = Door(
    api="audio.speech",
    id_prefix="speech-",
    body=SpeechRequest,
    translate=_speech_request,
    answer=lambda *_: None,  # answered by `_speak`
    frames=lambda *_: None,  # type: ignore[arg-type]
)


async def _speak(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    chat, translated, _ = await prepared(SPEECH_DOOR, request)
    events = await until_disconnect(request, service.open_choices(chat))
    fmt, stream_format = translated.context
    sse = stream_format == "sse"

    async def audio() -> AsyncGenerator[bytes, None]:
        try:
            async for _, event in events:
                if isinstance(event, AudioDelta) and sse:
                    yield frame(json.dumps({"type": "speech.audio.delta",
                                            "audio": base64.b64encode(event.data).decode()}))
                elif isinstance(event, AudioDelta):
                    yield event.data
                elif isinstance(event, Finished) and sse:
                    usage = event.usage
                    yield frame(json.dumps({"type": "speech.audio.done", "usage": {
                        "input_tokens": usage.prompt_tokens,
                        "output_tokens": usage.completion_tokens,
                        "total_tokens": usage.prompt_tokens + usage.completion_tokens}}))
        finally:
            await events.aclose()

    # The event stream's response: a client that leaves, or stops reading, gives back
    # its place on the engine (an HTTP byte stream otherwise, or OpenAI's speech events).
    media_type = "text/event-stream" if sse else _MEDIA_TYPES[fmt]
    return _AudioResponse(OwnedStream(audio(), events.aclose), write_timeout(request), media_type)


class _AudioResponse(EventStreamResponse):
    def __init__(self, frames: OwnedStream[bytes], write_timeout_s: float, media_type: str) -> None:
        self.media_type = media_type
        super().__init__(frames, write_timeout_s)


TRANSCRIPTION_DOOR: Door[Any, Any] = Door(
    api="audio.transcriptions",
    id_prefix="transcript-",
    body=SpeechRequest,  # unused: the form is read by `_transcribe`
    translate=lambda body: Translated(body, None),
    answer=lambda *_: None,
    frames=lambda *_: None,  # type: ignore[arg-type]
)

_FORM_FIELDS = ("model", "language", "prompt", "response_format", "temperature")


async def _form(request: Request) -> tuple[dict[str, str], bytes, str]:
    """The form's fields and its file, read within the audio body limit."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequestError("Content-Type must be multipart/form-data with a `file` part.",
                                  code="unsupported_content_type")  # fmt: skip
    # Read whole within the limit first: the parser itself would spool any size to disk.
    request._body = await read_body(request, request.app.state.settings.max_audio_body_bytes)
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # the multipart parser's own errors, on malformed bodies
        raise InvalidRequestError(f"The multipart body cannot be read: {exc}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("file: the audio file part is missing.", param="file",
                                      code="missing_required_parameter")  # fmt: skip
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k in _FORM_FIELDS}
        return fields, await upload.read(), upload.filename or "audio"
    finally:
        await form.close()  # the parser's spooled files


def _transcription_request(fields: dict[str, str], data: bytes) -> ChatCompletionRequest:
    inline = "data:audio/octet-stream;base64," + base64.b64encode(data).decode()
    parts: list[dict[str, Any]] = [{"type": "input_audio", "input_audio": {"data": inline}}]
    if fields.get("prompt"):
        parts.append({"type": "text", "text": fields["prompt"]})
    body: dict[str, Any] = {"model": fields.get("model", ""),
                            "messages": [{"role": "user", "content": parts}]}  # fmt: skip
    if fields.get("language"):
        body["asr_options"] = {"language": fields["language"]}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = validation_message(exc, body)
        if error.param == "asr_options.language":
            error.param, error.message = "language", error.message.replace(
                "asr_options.language", "language")  # fmt: skip
        raise error from None


async def _transcribe(request: Request) -> Response:
    principal = await require_principal(request)
    service: ChatService = request.app.state.chat
    try:
        fields, data, _ = await _form(request)
        fmt = fields.get("response_format", "json")
        if fmt not in ("json", "text", "srt", "verbose_json", "vtt"):
            raise InvalidRequestError(
                f"response_format: {fmt!r} is not one of json, text, srt, verbose_json, vtt.",
                param="response_format",
            )  # fmt: skip
        canonical = _transcription_request(fields, data)
    except MimoError as exc:  # a bad form, a body over the limit
        service.record_refusal(principal, None, exc.status_code, TRANSCRIPTION_DOOR.api)
        raise
    chat = bound(TRANSCRIPTION_DOOR, request, principal, canonical)
    answers = await until_disconnect(request, service.complete_choices(chat))
    return _transcript(chat, answers[0], fmt)  # type: ignore[arg-type]


def _transcript(chat: PreparedChat, answer: Answer, fmt: TranscriptFormat) -> Response:
    text = "".join(answer.content)
    seconds = answer.usage.audio_seconds
    usage = TranscriptionUsage(seconds=math.ceil(seconds))
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(answer.segments, fmt))
    if fmt == "verbose_json":
        segments = [TranscriptSegment(id=i, start=s.start, end=s.end, text=s.text)
                    for i, s in enumerate(answer.segments)]  # fmt: skip
        verbose = VerboseTranscription(language="english", duration=round(seconds, 3), text=text,
                                       segments=segments, usage=usage)  # fmt: skip
        return JSONResponse(verbose.model_dump(mode="json"))
    return JSONResponse(Transcription(text=text, usage=usage).model_dump(mode="json"))


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(segments: list[HeardSegment], fmt: str) -> str:
    if fmt == "vtt":
        cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n"
                for s in segments]  # fmt: skip
        return "WEBVTT\n\n" + "\n".join(cues)
    cues = [f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
            for i, s in enumerate(segments, start=1)]  # fmt: skip
    return "\n".join(cues)


routes = [
    Route("/v1/audio/speech", handler(SPEECH_DOOR, _speak), methods=["POST"]),
    Route("/v1/audio/transcriptions", handler(TRANSCRIPTION_DOOR, _transcribe), methods=["POST"]),
]
