"""The model registry: public model ids -> weights, backend and capabilities (a TOML file)."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mimoserve.billing.prices import Price


class RegistryError(Exception):
    pass


EngineKind = Literal["vllm", "sglang", "llama.cpp", "mimoserve", "openai"]
Modality = Literal["text", "image", "audio", "video"]


class UpstreamSpec(BaseModel):
    """One replica of an OpenAI-compatible engine that serves a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://", description="Base URL, up to and including /v1")
    kind: EngineKind = "openai"
    model: str | None = Field(default=None, description="The engine's model name; the id if unset")
    api_key_env: str | None = Field(
        default=None, description="Environment variable that holds the engine's key"
    )


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    weights: str | None = Field(
        default=None, description="A catalog name (see `mimoserve models list`) or a GGUF path"
    )
    # llamacpp: the embedded language engine; tts / asr: the embedded speech engines.
    backend: Literal["llamacpp", "upstream", "tts", "asr"] = "llamacpp"
    upstreams: tuple[UpstreamSpec, ...] = ()
    input_modalities: frozenset[Modality] = Field(
        default=frozenset({"text"}), description="Content kinds the upstream engine accepts"
    )
    upstream_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest wait for an upstream's next byte"
    )
    context_length: int | None = Field(
        default=None, ge=256, description="Context window; defaults to the server's n_ctx"
    )
    tool_parser: Literal["hermes", "mimo_xml"] | None = Field(
        default="hermes", description="Format of <tool_call> blocks the model writes"
    )
    bare_json_tool_calls: bool = Field(
        default=False,
        description="Also take an answer that is only a JSON call to a declared tool as a call",
    )
    reasoning_parser: Literal["think"] | None = Field(
        default="think", description="Parse <think> blocks into reasoning_content"
    )
    thinking: Literal["none", "native", "prompted"] = Field(
        default="prompted",
        description="native: the template has a thinking switch; prompted: the server opens "
        "the <think> block for the model; none: the model cannot reason",
    )
    thinking_default: bool = Field(
        default=False, description="Whether requests without `thinking` reason"
    )
    price: Price | None = Field(
        default=None, description="Per million tokens, in the registry's currency; unset: free"
    )
    thinking_budget: int | None = Field(
        default=None,
        ge=1,
        description="Reasoning tokens after which the server closes the think block, unless "
        "the request sets thinking.budget_tokens",
    )
    voices: dict[str, str] = Field(
        default_factory=dict,
        description="tts: the voice ids clients send (audio.voice) -> the engine's voices",
    )
    voice_source: Literal["builtin", "design", "clone"] = Field(
        default="builtin",
        description="tts: where the voice comes from; design (a description) and clone (a "
        "sample) are refused by the embedded engine",
    )
    speech_recognizer: str | None = Field(
        default=None,
        description="llamacpp with audio input: the ASR weights that transcribe audio parts "
        "for the language model (a cascade, not native audio understanding)",
    )

    @model_validator(mode="after")
    def _backend_has_what_it_needs(self) -> ModelEntry:
        if self.backend == "llamacpp" and not self.weights:
            raise ValueError(f"model {self.id!r}: the llamacpp backend needs `weights`")
        if self.backend == "upstream" and not self.upstreams:
            raise ValueError(f"model {self.id!r}: the upstream backend needs `upstreams`")
        if self.backend in ("tts", "asr") and not self.weights:
            raise ValueError(f"model {self.id!r}: the {self.backend} backend needs `weights`")
        if self.backend == "llamacpp":
            audio = {"text", "audio"} if self.speech_recognizer else {"text"}
            if self.input_modalities not in ({"text"}, audio):
                raise ValueError(
                    f"model {self.id!r}: the embedded engine takes text, and audio only "
                    "with a `speech_recognizer` to transcribe it"
                )
        return self


_CURRENCY = r"^[A-Z]{3}$"  # ISO 4217, stated once for every price


class ModelRegistry:
    def __init__(self, entries: list[ModelEntry], currency: str = "USD") -> None:
        if not entries:
            raise RegistryError("the registry declares no models")
        self._entries = {entry.id: entry for entry in entries}
        self.currency = currency

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def with_weights(self, weights: str) -> ModelRegistry:
        """The same ids, all served by other weights (for `serve --weights`)."""
        return ModelRegistry([
            e.model_copy(update={"weights": weights}) if e.backend == "llamacpp" else e
            for e in self._entries.values()
        ], self.currency)  # fmt: skip

    def without_speech(self) -> ModelRegistry:
        """The same ids less the speech models; ids that heard audio through a
        recogniser take text only."""
        text_only = {"speech_recognizer": None, "input_modalities": frozenset({"text"})}
        kept = [
            e.model_copy(update=text_only) if e.speech_recognizer else e
            for e in self._entries.values() if e.backend not in ("tts", "asr")
        ]  # fmt: skip
        return ModelRegistry(kept, self.currency)

    @classmethod
    def from_toml(cls, text: str, source: str = "registry") -> ModelRegistry:
        try:
            data = tomllib.loads(text)
            models = data.get("models", {})
            entries = [ModelEntry(id=model_id, **fields) for model_id, fields in models.items()]
            currency = data.get("currency", "USD")
        except (tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
            raise RegistryError(f"{source}: {exc}") from exc
        unknown = set(data) - {"models", "currency"}
        if unknown:
            raise RegistryError(f"{source}: unknown top-level keys: {', '.join(sorted(unknown))}")
        if not isinstance(currency, str) or not re.match(_CURRENCY, currency):
            raise RegistryError(f"{source}: currency must be a three-letter code such as USD")
        return cls(entries, currency)

    @classmethod
    def load(cls, path: Path | None) -> ModelRegistry:
        if path is None:
            text = resources.files("mimoserve").joinpath("default_registry.toml").read_text()
            return cls.from_toml(text, "default registry")
        return cls.from_toml(path.read_text(), str(path))
