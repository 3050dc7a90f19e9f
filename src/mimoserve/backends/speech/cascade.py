"""Audio understanding on a text model: hear the audio, then let the model read it.

An omni id served by the embedded language model (`mimo-v2.5` on a laptop) takes
`input_audio` parts: each is transcribed by the speech recogniser and replaced by its
transcript, and the language model answers the conversation that results. This is a
cascade: the model reads words, not tone, music or who is speaking.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from mimoserve.audio.codec import HEARING_RATE
from mimoserve.backends.base import Backend, Capabilities, ChatRequest, lower_cap
from mimoserve.backends.speech.asr import Listener, Listening
from mimoserve.backends.speech.engines import audio_tokens
from mimoserve.events import Finished, GenerationEvent, KvCells
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.messages import AudioPart, TextPart, UserMessage

_PLACEHOLDER = "(audio)"


def transcript_part(text: str) -> TextPart:
    return TextPart(type="text", text=f"<audio transcript>\n{text.strip()}\n</audio transcript>")


def with_parts_replaced(request: ChatCompletionRequest, texts: list[str]) -> ChatCompletionRequest:
    """The request with its audio parts, in order, replaced by these texts."""
    remaining = iter(texts)
    messages = []
    for message in request.messages:
        if isinstance(message, UserMessage) and not isinstance(message.content, str):
            parts = [transcript_part(next(remaining)) if isinstance(part, AudioPart) else part
                     for part in message.content]  # fmt: skip
            message = message.model_copy(update={"content": parts})
        messages.append(message)
    return request.model_copy(update={"messages": messages})


@dataclass
class _Transcripts:
    """One request's audio, heard once for all its choices."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    texts: list[str] | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Heard:
    chat: ChatRequest
    listening: Listening
    transcripts: _Transcripts
    max_tokens: int | None = None
    choice: int = 0

    @property
    def speech_claim(self) -> tuple[float, int]:
        return self.listening.speech_claim

    def capped(self, max_tokens: int) -> Heard:
        return replace(self, max_tokens=lower_cap(self.max_tokens, max_tokens))

    def for_choice(self, index: int) -> Heard:
        return replace(self, choice=index)


class TranscribingBackend:
    """A text backend that also takes audio, through a listener."""

    def __init__(self, inner: Backend[Any], listener: Listener) -> None:
        self.inner = inner
        self._listener = listener
        self._capabilities = replace(
            inner.capabilities, input_modalities=inner.capabilities.input_modalities | {"audio"}
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_name(self) -> str:
        return self.inner.weights_name

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    def prepare(self, chat: ChatRequest) -> Any:
        listening = self._listener.check(chat.request, chat.entry.id)
        if not listening.sources:
            return self.inner.prepare(chat)
        # Everything but the audio is checked now, before admission, on placeholders.
        placeholders = [_PLACEHOLDER] * len(listening.sources)
        self.inner.prepare(replace(chat, request=with_parts_replaced(chat.request, placeholders),
                                   raw=None))  # fmt: skip
        return Heard(chat, listening, _Transcripts())

    async def count_tokens(self, prepared: Any) -> int:
        if not isinstance(prepared, Heard):
            return await self.inner.count_tokens(prepared)
        return await self.inner.count_tokens(await self._text_request(prepared))

    async def _text_request(self, heard: Heard) -> Any:
        transcripts = heard.transcripts
        async with transcripts.lock:
            if transcripts.texts is None:
                transcripts.texts, transcripts.seconds = await self._hear(heard.listening)
        request = with_parts_replaced(heard.chat.request, transcripts.texts)
        prepared = self.inner.prepare(replace(heard.chat, request=request, raw=None))
        if heard.max_tokens is not None:
            prepared = prepared.capped(heard.max_tokens)
        return prepared.for_choice(heard.choice) if heard.choice else prepared

    async def _hear(self, listening: Listening) -> tuple[list[str], float]:
        listener = self._listener
        texts: list[str] = []
        seconds = 0.0
        unprompted = replace(listening, prompt=None)  # the conversation is for the model
        async with listener.gate:
            for samples in await listener.decoded(listening):
                seconds += samples.size / HEARING_RATE
                texts.append("".join([s.text async for s in listener.heard(samples, unprompted)]))
        return texts, seconds

    async def generate(self, prepared: Any) -> AsyncGenerator[GenerationEvent, None]:
        heard = isinstance(prepared, Heard)
        text_request = await self._text_request(prepared) if heard else prepared
        seconds = prepared.transcripts.seconds if heard else 0.0
        async with aclosing(self.inner.generate(text_request)) as events:
            async for event in events:
                if heard and isinstance(event, Finished):
                    usage = replace(event.usage, audio_seconds=seconds,
                                    audio_tokens=audio_tokens(seconds))  # fmt: skip
                    event = replace(event, usage=usage)
                yield event

    def load(self) -> tuple[int, int]:
        return self.inner.load()

    def kv_cells(self) -> KvCells | None:
        return self.inner.kv_cells()

    async def close(self) -> None:
        return None  # the engine is the inner backend's, closed as such (`engine_of`)

