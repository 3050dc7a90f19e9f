"""create_app: the one place where concrete classes are built and wired together."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from mimoserve import __version__
from mimoserve.api import admin as admin_api
from mimoserve.api import anthropic, audio, chat, health, models, responses
from mimoserve.api.dashboard import DashboardFiles
from mimoserve.api.errors import install_error_handlers
from mimoserve.api.openapi import install_openapi
from mimoserve.api.request_id import RequestIdMiddleware
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.base import Backend, engine_of
from mimoserve.backends.upstream.client import UpstreamModel
from mimoserve.backends.upstream.fleet import UpstreamFleet
from mimoserve.backends.upstream.media import MediaLimits
from mimoserve.billing.budgets import BudgetStore
from mimoserve.billing.keeper import BudgetKeeper, LocalBudgetKeeper
from mimoserve.billing.redis_keeper import RedisBudgetKeeper
from mimoserve.billing.service import Budgets, report
from mimoserve.chat.service import ChatService
from mimoserve.config import Settings
from mimoserve.limits.admission import AdmissionPolicy
from mimoserve.limits.limiter import Limiter, RateLimiter
from mimoserve.metering.ledger import UsageLedger
from mimoserve.metering.metrics import Metrics
from mimoserve.registry import ModelRegistry
from mimoserve.store.usage import SqlUsageStore


def create_app(
    settings: Settings,
    *,
    registry: ModelRegistry,
    backends: Mapping[str, Backend[Any]],
    keys: KeyStore,
    ledger: UsageLedger | None = None,
    admin: AdminCredential | None = None,
    usage: SqlUsageStore | None = None,
    limiter: Limiter | None = None,
    upstreams: Mapping[str, UpstreamModel] | None = None,
) -> FastAPI:
    """Builds the ASGI app around ready components; `backends` maps public model ids."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if ledger is not None:
            ledger.start()
        fleet.start()  # active health checks of upstream replicas
        yield
        await fleet.close()
        # Several ids may share one backend: close each once.
        for backend in {id(engine_of(b)): engine_of(b) for b in backends.values()}.values():
            await backend.close()
        if ledger is not None:
            await ledger.close()  # drains every record accepted so far
        await rate_limiter.close()  # after the streams: their settlements are sent first
        await budgets.keeper.close()

    app = FastAPI(title="mimoserve", version=__version__, lifespan=lifespan,
                  **_telemetry_options(settings.opentelemetry))  # fmt: skip
    app.state.settings = settings
    app.state.keys = keys
    metrics = Metrics(
        load_probe=lambda: chat_service.catalogue.engine_load(),
        memory_probe=lambda: chat_service.catalogue.engine_memory(),
        ledger_probe=(lambda: (ledger.pending, ledger.set_aside_total)) if ledger else None,
        routing_probe=lambda: fleet.routing(),
    )
    policy = AdmissionPolicy(settings.default_limits, settings.completion_reserve_tokens)
    rate_limiter = limiter or RateLimiter()
    media = MediaLimits.allowing(settings.media_url_allow)
    fleet = UpstreamFleet(upstreams or {}, media)
    budget_store = BudgetStore(keys.database)
    on_change = functools.partial(report, metrics)
    keeper: BudgetKeeper = (
        RedisBudgetKeeper(settings.redis_url, budget_store.spent_since, on_change=on_change)
        if settings.redis_url
        else LocalBudgetKeeper(budget_store.spent_since, on_change)
    )
    budgets = Budgets(budget_store, keeper, keys.local_reads)
    chat_service = ChatService(
        registry, {**backends, **fleet.backends}, metrics, ledger, rate_limiter, policy, budgets
    )
    app.state.budgets = budgets
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.limiter = rate_limiter
    app.state.chat = chat_service
    app.state.admin = admin
    app.state.usage = usage
    install_error_handlers(app)
    # Outermost, around Starlette's own server-error layer too, so every answer (errors
    # from any layer, 500s, streams) carries the id.
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIdMiddleware(build_stack())  # type: ignore[method-assign]
    install_openapi(app, [entry.id for entry in registry.entries()])
    if admin is not None and usage is not None:
        app.include_router(admin_api.router)
        app.mount("/dashboard", DashboardFiles(), name="dashboard")
    # Plain Starlette routes first: matched before every other route.
    app.router.routes[:0] = [*chat.routes, *anthropic.routes, *responses.routes, *audio.routes]
    app.include_router(models.router)
    app.include_router(health.router)
    return app


def _telemetry_options(enabled: bool) -> dict[str, Any]:
    """FastAPI's own OpenTelemetry spans, metrics and logs (FastAPI >= 0.163).

    Off unless asked for: /metrics already serves Prometheus, and the middleware cost
    about 5 % of a relayed request even with no exporter configured (py-spy).
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # an older FastAPI: no such middleware
    if enabled:
        return {}  # FastAPI's defaults: everything on, exporters from the environment
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}
