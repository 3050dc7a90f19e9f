"""Speech recognition behind chat completions (the hosted `mimo-v2.5-asr` contract).

The audio is a user message's `input_audio` parts (several are heard in order); text
parts beside them are a prompt for the recogniser (names, spellings), as OpenAI's
transcription `prompt` is. The transcript is the answer's content, streamed a segment at
a time when asked; usage counts the audio as prompt tokens and reports its seconds.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from mimoserve.audio.codec import HEARING_RATE, AudioDecodeError, decode_speech
from mimoserve.backends.base import Capabilities, ChatRequest, lower_cap
from mimoserve.backends.speech.audio_input import AudioSource, audio_bytes, audio_sources
from mimoserve.backends.speech.engines import EngineGate, Heard, Recognizer, audio_tokens
from mimoserve.backends.upstream.media import MediaLimits
from mimoserve.errors import InvalidRequestError
from mimoserve.events import (
    ContentDelta,
    Finished,
    GenerationEvent,
    HeardSegment,
    KvCells,
    Progress,
    Started,
    TokenUsage,
)
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.messages import TextPart

_CHARS_PER_TOKEN = 4
_BYTES_PER_SECOND = 4000
SPEECH_CONTEXT_TOKENS = 8192


@dataclass(frozen=True)
class Listening:
    """A checked recognition request."""

    sources: tuple[AudioSource, ...]
    language: str | None  # None: the recogniser finds out
    prompt: str | None
    claim_seconds: float = 0.0  # the audio's length as estimated before decoding
    max_tokens: int | None = None

    @property
    def speech_claim(self) -> tuple[float, int]:
        """(seconds, characters) for budgets: the length is known only once decoded, under
        the engine's gate, so it is estimated from the size (as prompt tokens are)."""
        return self.claim_seconds, 0

    def capped(self, max_tokens: int) -> Listening:
        return replace(self, max_tokens=lower_cap(self.max_tokens, max_tokens))


class Listener:
    """The recogniser with its line, limits and caps: what an ASR model and a cascade
    (an omni id on a text model) both use to hear a request's audio."""

    def __init__(self, engine: Recognizer, weights_name: str, gate: EngineGate,
                 limits: MediaLimits, max_seconds: float) -> None:  # fmt: skip
        self.engine = engine
        self.weights_name = weights_name
        self.gate = gate
        self.limits = limits
        self.max_seconds = max_seconds

    def check(self, request: ChatCompletionRequest, model: str) -> Listening:
        sources = audio_sources(request, self.limits)
        if not sources:  # nothing to hear: the options do not matter
            return Listening((), None, None)
        options = request.asr_options
        language = None if options is None or options.language == "auto" else options.language
        if language is not None and language not in self.engine.languages:
            heard = ", ".join(sorted(self.engine.languages))
            raise InvalidRequestError(
                f"asr_options.language: the speech recogniser behind {model!r} "
                f"({self.weights_name}) hears {heard} only, not {language!r}.",
                param="asr_options.language", code="unsupported_language",
            )  # fmt: skip
        if language is None and self.engine.languages == {"en"}:
            language = "en"  # an English-only model has nothing to detect
        prompt = " ".join(
            part.text for message in request.messages if not isinstance(message.content, str)
            for part in message.content or () if isinstance(part, TextPart)
        )  # fmt: skip
        return Listening(sources, language, prompt or None, self._claim_seconds(sources))

    def _claim_seconds(self, sources: tuple[AudioSource, ...]) -> float:
        """Compact speech (32 kbit/s: 4,000 bytes a second) as the bound; a URL's size is
        unknown until fetched: the duration cap."""
        total = sum(len(s.value) * 3 / 4 / _BYTES_PER_SECOND if s.host is None
                    else self.max_seconds for s in sources)  # fmt: skip
        return min(total, self.max_seconds)

    async def samples(self, listening: Listening) -> npt.NDArray[np.float32]:
        """Every source decoded (and fetched) in order, as one stretch of 16 kHz audio."""
        pieces = await self.decoded(listening)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    async def decoded(self, listening: Listening) -> list[npt.NDArray[np.float32]]:
        """Each source decoded (and fetched), in order; the duration cap counts them all."""
        pieces: list[npt.NDArray[np.float32]] = []
        left = self.max_seconds
        for source in listening.sources:
            if left <= 0:
                raise source.refuse(f"the audio parts together are longer than "
                                    f"{self.max_seconds:g} seconds")  # fmt: skip
            data = await audio_bytes(source, self.limits)
            try:
                samples = await self.gate.run(decode_speech, data, left)
            except AudioDecodeError as exc:
                raise source.refuse(str(exc)) from None
            left -= samples.size / HEARING_RATE
            pieces.append(samples)
        return pieces

    async def heard(
        self, samples: npt.NDArray[np.float32], listening: Listening
    ) -> AsyncIterator[Heard]:
        segments = iter(self.engine.transcribe(samples, listening.language, listening.prompt))
        while (segment := await self.gate.run(next, segments, None)) is not None:
            yield segment


class AsrBackend:
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._capabilities = Capabilities(
            context_length=SPEECH_CONTEXT_TOKENS, input_modalities=frozenset({"text", "audio"})
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_name(self) -> str:
        return self._listener.weights_name

    @property
    def healthy(self) -> bool:
        return True

    def prepare(self, chat: ChatRequest) -> Listening:
        request, model = chat.request, chat.entry.id
        for name in ("tools", "response_format", "prediction", "audio"):
            if getattr(request, name) is not None:
                raise InvalidRequestError(f"{name}: {model!r} transcribes audio; it takes no "
                                          f"{name}.", param=name)  # fmt: skip
        listening = self._listener.check(request, model)
        if not listening.sources:
            raise InvalidRequestError(
                f"messages: {model!r} transcribes a user message's input_audio part, and "
                "none was sent.", param="messages",
            )  # fmt: skip
        return listening

    async def count_tokens(self, prepared: Listening) -> int:
        samples = await self._listener.samples(prepared)
        return self._prompt_tokens(samples.size / HEARING_RATE, prepared)

    @staticmethod
    def _prompt_tokens(seconds: float, listening: Listening) -> int:
        return audio_tokens(seconds) + math.ceil(len(listening.prompt or "") / _CHARS_PER_TOKEN)

    async def generate(self, listening: Listening) -> AsyncGenerator[GenerationEvent, None]:
        listener = self._listener
        async with listener.gate:
            samples = await listener.samples(listening)
            seconds = samples.size / HEARING_RATE
            prompt_tokens = self._prompt_tokens(seconds, listening)
            yield Started(prompt_tokens=prompt_tokens)
            written, reason, first = 0, "stop", True
            async for segment in listener.heard(samples, listening):
                text = segment.text.lstrip() if first else segment.text
                first = False
                written += segment.tokens
                yield Progress(segment.tokens)
                if text:
                    yield HeardSegment(segment.start, segment.end, text.strip())
                    yield ContentDelta(text)
                if listening.max_tokens is not None and written >= listening.max_tokens:
                    reason = "length"
                    break
            usage = TokenUsage(
                prompt_tokens=prompt_tokens, completion_tokens=written,
                audio_tokens=audio_tokens(seconds), audio_seconds=seconds,
            )  # fmt: skip
            yield Finished(reason, usage)  # type: ignore[arg-type]

    def load(self) -> tuple[int, int]:
        return self._listener.gate.running, self._listener.gate.waiting

    def kv_cells(self) -> KvCells | None:
        return None

    async def close(self) -> None:
        return None
