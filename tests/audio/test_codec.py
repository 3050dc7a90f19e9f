"""The audio codec against hostile input: whatever bytes arrive, decoding either gives
samples within the cap or refuses with AudioDecodeError, never anything else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimoserve.audio.codec import (
    HEARING_RATE,
    AudioDecodeError,
    SpeechEncoder,
    decode_speech,
    encode_whole,
    wav_header,
)

_T = np.arange(22050) / 22050
ONE_SECOND = (np.sin(2 * np.pi * 300 * _T) * 9000).astype(np.int16)
WAV = encode_whole("wav", 22050, ONE_SECOND)
MP3 = encode_whole("mp3", 22050, ONE_SECOND)


def _decoded_or_refused(data: bytes) -> None:
    try:
        samples = decode_speech(data, 2.0)
    except AudioDecodeError as exc:
        assert str(exc)
    else:
        assert samples.dtype == np.float32 and samples.size <= 2 * HEARING_RATE


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    _decoded_or_refused(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([WAV, MP3]), st.data())
def test_damaged_files_decode_or_are_refused_cleanly(original: bytes, data: st.DataObject) -> None:
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 12))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    _decoded_or_refused(bytes(damaged[:cut]))


def test_a_streamed_wav_is_the_whole_wav_with_an_open_length() -> None:
    encoder = SpeechEncoder("wav", 22050)
    pieces = [encoder.encode(ONE_SECOND[i:i + 5000]) for i in range(0, ONE_SECOND.size, 5000)]
    streamed = wav_header(None) + b"".join(pieces) + encoder.finish()
    assert streamed[44:] == WAV[44:]
    assert decode_speech(streamed, 5).size == pytest.approx(HEARING_RATE, abs=2)


def test_the_cap_counts_while_decoding() -> None:
    with pytest.raises(AudioDecodeError, match=r"longer than 0\.5 seconds"):
        decode_speech(WAV, 0.5)
