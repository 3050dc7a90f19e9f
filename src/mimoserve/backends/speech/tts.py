"""Speech synthesis behind chat completions (the hosted `mimo-v2.5-tts` contract).

The text to speak is the last assistant message; a user message (style instructions)
is accepted and not followed: the embedded voice has one way of speaking. `<style>…</style>`
and `[audio tags]` steer the hosted voices; here they are removed rather than read aloud.
A streamed answer sends each sentence's audio as it is synthesised.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, replace

from mimoserve.audio.codec import AudioFormat, SpeechEncoder, wav_header
from mimoserve.backends.base import Capabilities, ChatRequest, lower_cap
from mimoserve.backends.speech.engines import EngineGate, Synthesizer, audio_tokens
from mimoserve.errors import InvalidRequestError
from mimoserve.events import (
    AudioDelta,
    Finished,
    GenerationEvent,
    KvCells,
    Progress,
    Started,
    TokenUsage,
)
from mimoserve.protocol.messages import AssistantMessage, TextPart

# As OpenAI's speech endpoint: longer text is a document to split, not one utterance.
MAX_SPEECH_CHARS = 4096
# Text is counted at about four characters a token (the engine speaks phonemes).
_CHARS_PER_TOKEN = 4
# Bounds prompt and audio tokens of one answer: 4,096 characters are a few minutes.
SPEECH_CONTEXT_TOKENS = 8192

_STYLE = re.compile(r"<style>.*?</style>", re.IGNORECASE | re.DOTALL)
_AUDIO_TAG = re.compile(r"\[[^\[\]\n]{1,40}\]")


def spoken_text(text: str) -> str:
    """The words to say: style blocks and bracketed audio tags removed, spaces tidied."""
    without = _AUDIO_TAG.sub(" ", _STYLE.sub(" ", text))
    return re.sub(r"[ \t]+", " ", without).strip()


@dataclass(frozen=True)
class Speech:
    """A checked synthesis request."""

    text: str
    voice: str  # the engine's voice
    format: AudioFormat
    streamed: bool
    speed: float = 1.0
    max_audio_tokens: int | None = None

    @property
    def speech_claim(self) -> tuple[float, int]:
        """(seconds, characters) at most: speech runs slower than five characters a second
        only with long pauses, which the engine does not make."""
        return len(self.text) / 5 / self.speed, len(self.text)

    def capped(self, max_tokens: int) -> Speech:
        return replace(self, max_audio_tokens=lower_cap(self.max_audio_tokens, max_tokens))


def _text_of(message: AssistantMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


class TtsBackend:
    def __init__(self, engine: Synthesizer, weights_name: str, gate: EngineGate) -> None:
        self._engine = engine
        self._weights_name = weights_name
        self._gate = gate
        self._capabilities = Capabilities(context_length=SPEECH_CONTEXT_TOKENS, audio_output=True)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_name(self) -> str:
        return self._weights_name

    @property
    def healthy(self) -> bool:
        return True

    def prepare(self, chat: ChatRequest) -> Speech:
        request, entry = chat.request, chat.entry
        if entry.voice_source != "builtin":
            raise InvalidRequestError(
                f"{entry.id!r} makes a voice from a {entry.voice_source!r} source, which the "
                f"embedded speech engine ({self._weights_name}, built-in voices only) cannot "
                "do; use a built-in voice, or serve this id from an upstream engine.",
                param="model", code="unsupported_model",
            )  # fmt: skip
        for field in ("tools", "response_format", "prediction"):
            if getattr(request, field) is not None:
                raise InvalidRequestError(f"{field}: {entry.id!r} speaks text; it takes no "
                                          f"{field}.", param=field)  # fmt: skip
        spoken = [m for m in request.messages if isinstance(m, AssistantMessage)]
        if not spoken:
            raise InvalidRequestError(
                f"messages: {entry.id!r} speaks the text of an assistant message, and none "
                "was sent.", param="messages",
            )  # fmt: skip
        text = spoken_text(_text_of(spoken[-1]))
        if not text:
            raise InvalidRequestError("messages: the assistant message has no text to speak.",
                                      param="messages")  # fmt: skip
        if len(text) > MAX_SPEECH_CHARS:
            raise InvalidRequestError(
                f"messages: {len(text)} characters to speak is over the limit of "
                f"{MAX_SPEECH_CHARS}; split the text.", param="messages",
            )  # fmt: skip
        audio = request.audio
        voice = audio.voice if audio is not None else "mimo_default"
        fmt: AudioFormat = audio.format if audio is not None else "wav"
        speed = audio.speed if audio is not None else 1.0
        return Speech(text, self._engine_voice(voice, entry.voices), fmt, request.stream, speed)

    def _engine_voice(self, voice: str, voices: Mapping[str, str]) -> str:
        engine_voice = voices.get(voice)
        if engine_voice is None and voice in self._engine.voices:
            engine_voice = voice  # the engine's own name for it
        if engine_voice is None or engine_voice not in self._engine.voices:
            known = ", ".join(sorted({*voices, *self._engine.voices}))
            raise InvalidRequestError(f"audio.voice: unknown voice {voice!r}; this model's "
                                      f"voices are {known}.", param="audio.voice",
                                      code="unknown_voice")  # fmt: skip
        return engine_voice

    async def count_tokens(self, prepared: Speech) -> int:
        return math.ceil(len(prepared.text) / _CHARS_PER_TOKEN)

    async def generate(self, speech: Speech) -> AsyncGenerator[GenerationEvent, None]:
        async with self._gate:
            prompt_tokens = await self.count_tokens(speech)
            yield Started(prompt_tokens=prompt_tokens)
            rate = self._engine.sample_rate
            encoder = SpeechEncoder(speech.format, rate)
            pieces = iter(self._engine.synthesize(speech.text, speech.voice, speech.speed))
            body: list[bytes] = []  # the whole answer's audio, when it is not streamed
            samples, counted, reason = 0, 0, "stop"
            while (pcm := await self._gate.run(next, pieces, None)) is not None:
                first = samples == 0
                samples += pcm.size
                # Resampling and encoding off the event loop too, on the engine's thread.
                data = await self._gate.run(encoder.encode, pcm)
                tokens = audio_tokens(samples / rate)
                yield Progress(tokens - counted)
                counted = tokens
                if speech.streamed:
                    header = wav_header(None) if first and speech.format == "wav" else b""
                    yield AudioDelta(header + data, speech.text if first else "")
                else:
                    body.append(data)
                if speech.max_audio_tokens is not None and tokens >= speech.max_audio_tokens:
                    reason = "length"
                    break
            tail = await self._gate.run(encoder.finish)
            if speech.streamed:
                if tail:
                    yield AudioDelta(tail)
            else:
                whole = b"".join(body) + tail
                header = wav_header(len(whole)) if speech.format == "wav" else b""
                yield AudioDelta(header + whole, speech.text)
            seconds = samples / rate
            usage = TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=counted,
                               audio_seconds=seconds, characters=len(speech.text))  # fmt: skip
            yield Finished(reason, usage)  # type: ignore[arg-type]

    def load(self) -> tuple[int, int]:
        return self._gate.running, self._gate.waiting

    def kv_cells(self) -> KvCells | None:
        return None

    async def close(self) -> None:
        return None

