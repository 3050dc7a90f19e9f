"""Liveness, readiness and metrics (no auth: load balancers and Prometheus call them)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mimoserve.auth.keys import KeyStore
from mimoserve.limits.limiter import Limiter
from mimoserve.metering.metrics import Metrics

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Models are loaded (they are before the app starts), the store and the limits answer."""
    keys: KeyStore = request.app.state.keys
    limiter: Limiter = request.app.state.limiter
    checks = {"store": "ok", "limits": "ok", "engines": "ok"}
    down = request.app.state.chat.catalogue.engines_down()
    if down:
        checks["engines"] = "down: " + ", ".join(down)
    try:
        await asyncio.to_thread(keys.count_active)
    except Exception:
        checks["store"] = "unreachable"
    try:
        await limiter.ping()
    except Exception:
        checks["limits"] = "unreachable"
    if any(value != "ok" for value in checks.values()):
        return JSONResponse({"status": "unavailable", **checks}, status_code=503)
    return JSONResponse({"status": "ready", **checks})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
