"""Builds the real server: weights pulled and loaded, key store opened, first key issued."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import IssuedKey, KeyStore
from mimoserve.backends.base import Backend
from mimoserve.backends.llamacpp.backend import LlamaCppBackend
from mimoserve.backends.llamacpp.model import EngineConfig
from mimoserve.backends.speech.asr import AsrBackend, Listener
from mimoserve.backends.speech.cascade import TranscribingBackend
from mimoserve.backends.speech.engines import (
    EngineGate,
    PiperSynthesizer,
    WhisperRecognizer,
)
from mimoserve.backends.speech.tts import TtsBackend
from mimoserve.backends.upstream.client import build_upstreams
from mimoserve.backends.upstream.media import MediaLimits
from mimoserve.config import Settings
from mimoserve.limits.limiter import Limiter, RateLimiter
from mimoserve.limits.redis_limiter import RedisRateLimiter
from mimoserve.metering.journal import UsageJournal, adopt_orphans
from mimoserve.metering.ledger import UsageLedger
from mimoserve.registry import ModelRegistry
from mimoserve.store.usage import SqlUsageStore
from mimoserve.weights.catalog import CATALOG
from mimoserve.weights.store import WeightsStore

log = logging.getLogger(__name__)


def load_registry(settings: Settings) -> ModelRegistry:
    registry = ModelRegistry.load(settings.registry_file)
    if not settings.speech:
        registry = registry.without_speech()
    return registry.with_weights(settings.weights) if settings.weights else registry


def build_backends(settings: Settings, registry: ModelRegistry) -> dict[str, Backend[Any]]:
    """One engine per distinct weights, shared by every model id that names them."""
    store = WeightsStore(settings.weights_dir)
    speech = SpeechEngines(settings, store)
    engines: dict[str, Backend[Any]] = {}
    by_model: dict[str, Backend[Any]] = {}
    for entry in registry.entries():
        if entry.backend in ("tts", "asr") and entry.weights is not None:
            by_model[entry.id] = speech.backend(entry.backend, entry.weights)
            continue
        if entry.backend != "llamacpp" or entry.weights is None:
            continue  # served by upstream engines (see build_relay)
        if entry.weights not in engines:
            path = store.resolve(entry.weights)
            log.info("loading %s from %s", entry.weights, path)
            config = EngineConfig(
                model_path=path,
                n_ctx=entry.context_length or settings.n_ctx,
                n_parallel=settings.n_parallel,
                kv_cells=settings.kv_cells,
                kv_type=settings.kv_type,
                flash_attn=settings.flash_attn == "on",
                n_threads=settings.n_threads,
                n_batch=settings.n_batch,
                max_queue=settings.max_queue,
                spec_max_draft=settings.spec_max_draft,
                kv_store_dir=settings.home / "kv-cache",
                kv_disk_bytes=settings.kv_disk_bytes,
                kv_host_bytes=settings.kv_host_bytes,
                weights_sha256=CATALOG[entry.weights].sha256 if entry.weights in CATALOG else None,
            )
            engines[entry.weights] = LlamaCppBackend(config, weights_name=entry.weights)
        by_model[entry.id] = engines[entry.weights]
        if entry.speech_recognizer is not None:  # audio parts heard first, then read
            listener = speech.listener(entry.speech_recognizer)
            by_model[entry.id] = TranscribingBackend(engines[entry.weights], listener)
    return by_model


class SpeechEngines:
    """Each speech model loaded once, whichever ids and cascades use it."""

    def __init__(self, settings: Settings, store: WeightsStore) -> None:
        self._settings = settings
        self._store = store
        self._threads = settings.n_threads or os.cpu_count() or 1
        self._limits = MediaLimits.allowing(settings.media_url_allow)
        self._listeners: dict[str, Listener] = {}
        self._backends: dict[str, Backend[Any]] = {}

    def listener(self, weights: str) -> Listener:
        if weights not in self._listeners:
            path = self._store.resolve(weights)
            log.info("loading speech recognition %s from %s", weights, path.parent)
            engine = WhisperRecognizer(path.parent, self._threads)
            gate = EngineGate(weights, self._settings.max_queue)
            self._listeners[weights] = Listener(engine, weights, gate, self._limits,
                                                self._settings.max_audio_seconds)  # fmt: skip
        return self._listeners[weights]

    def backend(self, kind: str, weights: str) -> Backend[Any]:
        if weights not in self._backends:
            if kind == "asr":
                self._backends[weights] = AsrBackend(self.listener(weights))
            else:
                path = self._store.resolve(weights)
                log.info("loading speech synthesis %s from %s", weights, path)
                gate = EngineGate(weights, self._settings.max_queue)
                engine = PiperSynthesizer(path, self._threads)
                self._backends[weights] = TtsBackend(engine, weights, gate)
        return self._backends[weights]


def open_ledger(settings: Settings, usage: SqlUsageStore) -> UsageLedger:
    """The ledger with its crash journal; records a killed process left are taken over."""
    folder = settings.home / "journal"
    journal = UsageJournal(folder)
    ledger = UsageLedger(usage, journal=journal)
    adopt_orphans(folder, ledger.adopt, own=journal.path)
    return ledger


def ensure_first_key(keys: KeyStore, announce: Callable[[IssuedKey], None]) -> None:
    if keys.count_active() == 0:
        announce(keys.create("default"))


def build_server_app(
    settings: Settings,
    announce_key: Callable[[IssuedKey], None],
    announce_admin: Callable[[str], None],
) -> FastAPI:
    registry = load_registry(settings)
    database = settings.open_database()
    keys = KeyStore(database)
    ensure_first_key(keys, announce_key)
    admin = AdminCredential(database)
    token = admin.ensure()
    if token is not None:
        announce_admin(token)
    backends = build_backends(settings, registry)
    usage = SqlUsageStore(database)
    limiter: Limiter = RedisRateLimiter(settings.redis_url) if settings.redis_url else RateLimiter()
    return create_app(
        settings, registry=registry, backends=backends, keys=keys,
        ledger=open_ledger(settings, usage), admin=admin, usage=usage, limiter=limiter,
        upstreams=build_upstreams(
            registry.entries(), cache_aware=settings.fleet_routing == "cache",
            redis_url=settings.redis_url,
        ),
    )  # fmt: skip
