"""The embedded speech engines: Piper voices speak, Whisper (CTranslate2) listens.

Both run on the CPU beside the language model. Each engine serves one request at a
time (a second would only split the same cores); requests wait their turn in a bounded
line, and past it get a 503 like the language engine's full queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from mimoserve.errors import OverloadedError

T = TypeVar("T")

# The hosted platform's usage shows 25 audio tokens for 4 seconds of speech; its audio
# tokenizer runs at 6.25 tokens a second, and audio is counted at that rate here.
AUDIO_TOKENS_PER_SECOND = 6.25


def audio_tokens(seconds: float) -> int:
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


class EngineGate:
    """One request on the engine at a time; at most `max_waiting` in line behind it. The
    engine's work runs on one thread of its own (`run`): CTranslate2 and ONNX Runtime
    keep a team of worker threads per calling thread, and a pool that hands the calls
    to different threads leaves several teams competing for two cores."""

    def __init__(self, name: str, max_waiting: int) -> None:
        self._name = name
        self._lock = asyncio.Lock()
        self._max_waiting = max_waiting
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"speech-{name}")
        self.waiting = 0
        self.running = 0

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def __aenter__(self) -> None:
        if self._lock.locked() and self.waiting >= self._max_waiting:
            raise OverloadedError(f"The {self._name} engine's queue is full; retry shortly.")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.running = 0
        self._lock.release()


class Synthesizer(Protocol):
    """Speaks text with one of its voices, a sentence or so at a time."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def voices(self) -> frozenset[str]: ...

    def synthesize(
        self, text: str, voice: str, speed: float = 1.0
    ) -> Iterator[npt.NDArray[np.int16]]: ...


@dataclass(frozen=True)
class Heard:
    """One stretch of recognised speech and the tokens the recogniser wrote for it."""

    text: str
    tokens: int
    start: float = 0.0  # seconds into the audio
    end: float = 0.0


class Recognizer(Protocol):
    """Writes down what 16 kHz mono samples say."""

    @property
    def languages(self) -> frozenset[str]: ...

    def transcribe(
        self, samples: npt.NDArray[np.float32], language: str | None, prompt: str | None
    ) -> Iterator[Heard]: ...


class PiperSynthesizer:
    def __init__(self, model_path: Path, threads: int) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        config_path = Path(f"{model_path}.json")
        options = onnxruntime.SessionOptions()
        # Beside a decoding language model: no more threads than the server was given.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: between sentences and after an answer
        # the cores belong to the language model's decoding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        # Arabic diacritics need a model of their own, which no English voice uses.
        self._voice = PiperVoice(session=session, config=config, use_tashkeel=False,
                                 download_dir=model_path.parent)  # fmt: skip
        speakers = json.loads(config_path.read_text(encoding="utf-8")).get("speaker_id_map") or {}
        self._speakers: dict[str, int | None] = {name: sid for name, sid in speakers.items()}
        if not self._speakers:
            self._speakers = {model_path.name.split("-")[1]: None}  # en_US-joe-medium -> joe

    @property
    def sample_rate(self) -> int:
        return int(self._voice.config.sample_rate)

    @property
    def voices(self) -> frozenset[str]:
        return frozenset(self._speakers)

    def synthesize(
        self, text: str, voice: str, speed: float = 1.0
    ) -> Iterator[npt.NDArray[np.int16]]:
        from piper.config import SynthesisConfig

        # Piper's length scale stretches each phoneme: its inverse is the speed.
        length = (self._voice.config.length_scale or 1.0) / speed
        config = SynthesisConfig(speaker_id=self._speakers[voice], length_scale=length)
        for chunk in self._voice.synthesize(text, syn_config=config):
            yield chunk.audio_int16_array


class WhisperRecognizer:
    def __init__(self, model_dir: Path, threads: int) -> None:
        from faster_whisper import WhisperModel

        logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # a line per request
        self._model = WhisperModel(str(model_dir), device="cpu", compute_type="int8",
                                   cpu_threads=threads, local_files_only=True)  # fmt: skip
        self._english_only = not self._model.model.is_multilingual

    @property
    def languages(self) -> frozenset[str]:
        return frozenset({"en"}) if self._english_only else frozenset({"en", "zh"})

    def transcribe(
        self, samples: npt.NDArray[np.float32], language: str | None, prompt: str | None
    ) -> Iterator[Heard]:
        # Greedy (beam 1) and no fallback re-decoding at higher temperatures: the same
        # audio always gives the same text, and a CPU second is not spent twice.
        segments, _ = self._model.transcribe(
            samples, language=language, beam_size=1, temperature=0.0,
            initial_prompt=prompt or None, condition_on_previous_text=False,
            vad_filter=False,
        )  # fmt: skip
        for segment in segments:
            yield Heard(segment.text, len(segment.tokens), segment.start, segment.end)
