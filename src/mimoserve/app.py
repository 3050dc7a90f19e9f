"""create_app: the one place where concrete classes are built and wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mimoserve import __version__
from mimoserve.api import chat, health, models
from mimoserve.api.errors import install_error_handlers
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.base import Backend
from mimoserve.chat.service import ChatService
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger
from mimoserve.metering.metrics import Metrics
from mimoserve.registry import ModelRegistry


def create_app(
    settings: Settings,
    *,
    registry: ModelRegistry,
    backends: Mapping[str, Backend],
    keys: KeyStore,
    ledger: UsageLedger | None = None,
) -> FastAPI:
    """Builds the ASGI app around ready components; `backends` maps public model ids."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if ledger is not None:
            ledger.start()
        yield
        # Several ids may share one backend: close each once.
        for backend in {id(b): b for b in backends.values()}.values():
            await backend.close()
        if ledger is not None:
            await ledger.close()  # drains every record accepted so far

    app = FastAPI(title="mimoserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.keys = keys
    metrics = Metrics(load_probe=lambda: chat_service.engine_load())
    chat_service = ChatService(registry, backends, metrics, ledger)
    app.state.metrics = metrics
    app.state.chat = chat_service
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
