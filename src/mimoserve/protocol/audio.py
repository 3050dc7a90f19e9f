"""OpenAI's audio endpoints, kept for speech clients (the platform's own shape is chat
completions): `POST /v1/audio/speech` and `POST /v1/audio/transcriptions`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mimoserve.protocol.wire import WireModel

# Formats OpenAI's speech endpoint names; the embedded engine writes wav, mp3 and pcm.
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
TranscriptFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class SpeechRequest(WireModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=4096)
    voice: str = Field(min_length=1, max_length=64)
    instructions: str | None = Field(default=None, max_length=4096)
    response_format: SpeechFormat = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


class TranscriptionUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: int


class Transcription(BaseModel):
    text: str
    usage: TranscriptionUsage


class TranscriptSegment(BaseModel):
    id: int
    start: float
    end: float
    text: str


class VerboseTranscription(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptSegment]
    usage: TranscriptionUsage
