"""Scripted speech engines: a voice that says each word as a quarter second of tone, and
an ear that hears how long the audio is. For the door tests, the browser and the fuzzer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from mimoserve.audio.codec import HEARING_RATE
from mimoserve.backends.base import Backend
from mimoserve.backends.speech.asr import AsrBackend, Listener
from mimoserve.backends.speech.engines import EngineGate, Heard
from mimoserve.backends.speech.tts import TtsBackend
from mimoserve.backends.upstream.media import MediaLimits

RATE = 16_000  # the scripted voice's own rate (the server sends 24 kHz)
WORD_S = 0.25  # the scripted voice says each word as a quarter second of tone

# Registry entries for the scripted speech models (ids `tts` and `asr`).
SPEECH_REGISTRY = """
[models.tts]
backend = "tts"
weights = "fake-voice"
voices = { mimo_default = "joe", default_en = "joe" }
[models.asr]
backend = "asr"
weights = "fake-asr"
"""


class ToneVoice:
    """Speaks a sentence as a tone a quarter second long per word."""

    sample_rate = RATE
    voices = frozenset({"joe"})

    def synthesize(
        self, text: str, voice: str, speed: float = 1.0
    ) -> Iterator[npt.NDArray[np.int16]]:
        for sentence in filter(None, (s.strip() for s in text.split("."))):
            samples = int(len(sentence.split()) * WORD_S / speed * RATE)
            t = np.arange(samples) / RATE
            yield (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


class LengthEar:
    """Hears how long the audio is (in whole seconds), one segment per second."""

    languages = frozenset({"en"})

    def __init__(self) -> None:
        self.prompts: list[str | None] = []

    def transcribe(
        self, samples: npt.NDArray[np.float32], language: str | None, prompt: str | None
    ) -> Iterator[Heard]:
        self.prompts.append(prompt)
        seconds = round(samples.size / HEARING_RATE)
        for second in range(seconds):
            yield Heard(f" tick{second}", 2, float(second), float(second + 1))


def speech_backends(ear: LengthEar | None = None, max_seconds: float = 30.0
                    ) -> dict[str, Backend[Any]]:  # fmt: skip
    """The `tts` and `asr` ids on scripted engines."""
    listener = Listener(ear or LengthEar(), "fake-asr", EngineGate("fake-asr", 4), MediaLimits(),
                        max_seconds)  # fmt: skip
    return {"tts": TtsBackend(ToneVoice(), "fake-voice", EngineGate("fake-voice", 4)),
            "asr": AsrBackend(listener)}  # fmt: skip
