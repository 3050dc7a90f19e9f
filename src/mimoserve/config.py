"""Server settings: every field can be set by a `MIMOSERVE_*` environment variable or CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mimoserve.limits.policy import Limits
from mimoserve.store import open_database
from mimoserve.store.base import Database


def _default_home() -> Path:
    return Path.home() / ".mimoserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIMOSERVE_", extra="ignore")

    home: Path = Field(
        default_factory=_default_home,
        description="Folder for the key database and downloaded weights",
    )
    models_dir: Path | None = Field(
        default=None, description="Folder for downloaded weights; <home>/models when unset"
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on")
    registry_file: Path | None = Field(
        default=None, description="Model registry TOML; the bundled default when unset"
    )
    weights: str | None = Field(
        default=None,
        description="Serve every registry model from these weights (catalog name or GGUF path)",
    )
    speech: bool = Field(
        default=True,
        description="Serve the registry's speech models (synthesis, recognition, audio on "
        "omni ids); off: about 330 MiB less memory, and those ids are not served",
    )
    n_ctx: int | None = Field(
        default=None,
        ge=256,
        description="Longest request (prompt and completion) in tokens; the model's trained "
        "context when unset",
    )
    kv_cells: int | None = Field(
        default=None,
        ge=256,
        description="KV pool shared by all requests of a model, in tokens; "
        "max(n_ctx, 16384) when unset",
    )
    kv_type: Literal["f16", "q8_0"] = Field(
        default="f16", description="KV cache precision; q8_0 roughly halves its memory"
    )
    flash_attn: Literal["on", "off"] = Field(
        # llama.cpp's CPU default, and the faster for prompts and long guessed runs; off
        # makes steps of 2-63 tokens at long contexts about half as dear (README:
        # "Flash attention and agents"), which is where an agent's short answers are.
        default="on",
        description="llama.cpp's flash attention; off: cheaper speculation steps of up to "
        "63 tokens at long contexts, prompts read ~10 % slower (q8_0 KV needs it on)",
    )
    kv_disk_bytes: int = Field(
        default=8 << 30,
        ge=0,
        description="Prompts' KV cells kept on disk (<home>/kv-cache), loaded instead of "
        "recomputed, across restarts too; least recently used dropped past this (0: off)",
    )
    kv_host_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Of the disk tier, the most recently used payloads also kept in memory",
    )
    n_parallel: int = Field(
        default=4, ge=1, le=64, description="Requests decoded together (continuous batching)"
    )
    n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for llama.cpp; all cores when unset"
    )
    n_batch: int = Field(
        default=512, ge=16, description="Tokens decoded per step, all sequences together"
    )
    max_queue: int = Field(
        default=16, ge=0, description="Requests that may wait for a busy engine before 503"
    )
    spec_max_draft: int = Field(
        # Measured (README): the code edit ran 1.2x faster with 64 than with 32; with
        # 127, 3.0x its speed without speculation against 2.8x with 64.
        default=127,
        ge=0,
        le=127,  # a step of 128 tokens: two of llama.cpp's flash-attention tiles
        description="Speculative decoding: most tokens guessed per sequence and step, from "
        "the client's prediction, the sequence's own text and recent outputs (0: off)",
    )
    stream_write_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A stream whose client takes no bytes for this long is ended (499) and "
        "gives back its place in the engine",
    )
    access_log: bool = Field(default=False, description="Log every request line (uvicorn's)")
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text or one JSON object each (with request ids)"
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's OpenTelemetry spans/metrics/logs (exporters from OTEL_* env)",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest accepted request body (413 above it)"
    )
    max_audio_body_bytes: int = Field(
        default=16 << 20,
        ge=1024,
        description="Largest chat completions body when inline audio makes up the excess "
        "over max_body_bytes (the hosted platform takes 10 MB of base64 audio)",
    )
    max_audio_seconds: float = Field(
        default=600, gt=0, le=7200,
        description="Longest audio one request may have heard (all its parts together)",
    )

    fleet_routing: Literal["cache", "least-outstanding"] = Field(
        default="cache",
        description="How upstream replicas are picked: by where the prompt's prefix is likely "
        "cached (within a load bound), or by least outstanding requests",
    )
    media_url_allow: str = Field(
        default="",
        description="Comma-separated hosts and networks (10.0.0.0/8) that relayed media URLs "
        "may point at although they are internal; by default only public addresses",
    )

    database_url: str | None = Field(
        default=None,
        description="postgresql://... shared by replicas; SQLite in <home> when unset",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis://... for rate limits shared by replicas; in-process when unset",
    )

    default_rpm: int | None = Field(
        default=None, ge=1, description="Requests/min per account and model (unset: no limit)"
    )
    default_tpm: int | None = Field(
        default=None, ge=1, description="Tokens/min per account and model (unset: no limit)"
    )
    default_max_concurrent: int | None = Field(
        default=None, ge=1, description="Requests in flight per key (unset: no limit)"
    )
    completion_reserve_tokens: int = Field(
        default=512,
        ge=1,
        description="Completion tokens reserved at admission when a request sets no maximum",
    )

    @model_validator(mode="after")
    def _batch_holds_every_lane(self) -> Settings:
        # Every running sequence decodes one token per step, all in one batch.
        if self.n_batch < self.n_parallel:
            raise ValueError(f"n_batch ({self.n_batch}) must be at least n_parallel")
        return self

    @model_validator(mode="after")
    def _quantized_kv_needs_flash_attention(self) -> Settings:
        # llama.cpp reads a quantized V cache only through flash attention.
        if self.kv_type != "f16" and self.flash_attn == "off":
            raise ValueError(f"kv_type {self.kv_type} needs flash_attn on")
        return self

    @property
    def default_limits(self) -> Limits:
        return Limits(self.default_rpm, self.default_tpm, self.default_max_concurrent)

    @property
    def database_path(self) -> Path:
        return self.home / "mimoserve.db"

    def open_database(self) -> Database:
        return open_database(self.database_url, self.database_path)

    @property
    def weights_dir(self) -> Path:
        return self.models_dir or self.home / "models"
