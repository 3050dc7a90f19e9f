"""Audio in and out of the speech engines, through FFmpeg's libraries (PyAV).

In: whatever clients record (wav, mp3, ogg/opus, webm, m4a, flac) becomes 16 kHz mono
float samples, what recognition hears, within a duration cap; anything else is refused.
Out: synthesised speech as wav, mp3 or raw 16-bit PCM, always at 24 kHz mono: the rate
OpenAI's `pcm16` promises, so a client that plays raw PCM needs no rate from us.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

import av
import av.error
import numpy as np
import numpy.typing as npt

HEARING_RATE = 16_000  # what speech recognition takes
SPEAKING_RATE = 24_000  # what synthesised speech is sent at, in every format

AudioFormat = Literal["wav", "mp3", "pcm16"]

# FFmpeg's demuxer names -> the names people know them by.
ACCEPTED_CONTAINERS = {
    "wav": "wav",
    "mp3": "mp3",
    "ogg": "ogg",
    "matroska,webm": "webm",
    "mov,mp4,m4a,3gp,3g2,mj2": "m4a",
    "flac": "flac",
}
ACCEPTED_NAMES = "wav, mp3, ogg/opus, webm, m4a or flac"

# Decoding errors FFmpeg and PyAV raise on hostile or truncated input.
_DECODE_ERRORS = (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError)


class AudioDecodeError(ValueError):
    """The bytes are not audio we accept; the message says why, for the client."""


def decode_speech(data: bytes, max_seconds: float) -> npt.NDArray[np.float32]:
    """16 kHz mono samples in [-1, 1]. Refuses other containers, files without an audio
    stream, undecodable data, and audio longer than `max_seconds` (found while decoding,
    so a long file costs no more than the cap)."""
    limit = int(max_seconds * HEARING_RATE)
    pieces: list[npt.NDArray[np.int16]] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            name = container.format.name
            if name not in ACCEPTED_CONTAINERS:
                raise AudioDecodeError(f"audio in the {name!r} format is not accepted; "
                                       f"send {ACCEPTED_NAMES}")  # fmt: skip
            if not container.streams.audio:
                raise AudioDecodeError("the file holds no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=HEARING_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    piece = np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1)
                    pieces.append(piece)
                    total += piece.size
                if total > limit:
                    raise AudioDecodeError(f"the audio is longer than {max_seconds:g} seconds")
            for out in resampler.resample(None):
                pieces.append(np.asarray(out.to_ndarray(), dtype=np.int16).reshape(-1))
    except AudioDecodeError:
        raise
    except _DECODE_ERRORS as exc:
        raise AudioDecodeError(f"the audio cannot be decoded ({exc.__class__.__name__}); "
                               f"send {ACCEPTED_NAMES}") from exc  # fmt: skip
    if not pieces:
        raise AudioDecodeError("the audio holds no samples")
    samples = np.concatenate(pieces)[:limit]
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


def wav_header(data_bytes: int | None) -> bytes:
    """A 16-bit mono 24 kHz WAV header; None: a stream of unknown length (sizes set to
    the maximum, as streaming encoders do; players read to the end)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, SPEAKING_RATE, SPEAKING_RATE * 2, 2, 16
    ) + b"data" + struct.pack("<I", size)


class SpeechEncoder:
    """One answer's speech, encoded piece by piece: 16-bit mono PCM at the engine's rate
    in, the requested format at 24 kHz out. `streamed`: a wav starts with a header of
    unknown length; otherwise `whole` gives one file with exact sizes."""

    def __init__(self, fmt: AudioFormat, source_rate: int) -> None:
        self.format = fmt
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SPEAKING_RATE)
        self._source_rate = source_rate
        self._pts = 0
        self._mp3: av.AudioCodecContext | None = None
        self._fifo: av.AudioFifo | None = None
        if fmt == "mp3":
            codec = av.CodecContext.create("libmp3lame", "w")
            assert isinstance(codec, av.AudioCodecContext)
            codec.sample_rate = SPEAKING_RATE
            codec.layout = "mono"
            codec.format = "s16p"
            codec.bit_rate = 64_000
            codec.open()
            self._mp3, self._fifo = codec, av.AudioFifo()

    def _resampled(self, pcm: npt.NDArray[np.int16] | None) -> list[av.AudioFrame]:
        if pcm is None:
            return self._resampler.resample(None)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._source_rate
        frame.pts = self._pts
        self._pts += pcm.size
        return self._resampler.resample(frame)

    def encode(self, pcm: npt.NDArray[np.int16]) -> bytes:
        return self._out(self._resampled(pcm), flush=False)

    def finish(self) -> bytes:
        return self._out(self._resampled(None), flush=True)

    def _out(self, frames: list[av.AudioFrame], *, flush: bool) -> bytes:
        if self._mp3 is None or self._fifo is None:
            return b"".join(bytes(frame.to_ndarray().reshape(-1).tobytes()) for frame in frames)
        for frame in frames:
            frame.pts = None  # the fifo keeps its own timing
            self._fifo.write(frame)
        packets: list[bytes] = []
        size = self._mp3.frame_size
        while self._fifo.samples >= size or (flush and self._fifo.samples):
            chunk = self._fifo.read(min(size, self._fifo.samples))
            assert chunk is not None
            packets.extend(bytes(p) for p in self._mp3.encode(chunk))
        if flush:
            packets.extend(bytes(p) for p in self._mp3.encode(None))
        return b"".join(packets)


def encode_whole(fmt: AudioFormat, source_rate: int, pcm: npt.NDArray[np.int16]) -> bytes:
    """One complete file (a wav with exact sizes)."""
    encoder = SpeechEncoder(fmt, source_rate)
    body = encoder.encode(pcm) + encoder.finish()
    return wav_header(len(body)) + body if fmt == "wav" else body
