"""The auth dependency: `api-key: KEY` or `Authorization: Bearer KEY` -> Principal."""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore, Principal
from mimoserve.errors import AuthenticationError

log = logging.getLogger(__name__)


def _presented_key(request: Request) -> str | None:
    # `api-key` (MiMo), `x-api-key` (Anthropic's SDKs and Claude Code), or Bearer.
    key = request.headers.get("api-key") or request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


async def require_principal(request: Request) -> Principal:
    key = _presented_key(request)
    if key is None:
        raise AuthenticationError(
            "Missing API key: send it as `api-key: KEY`, `x-api-key: KEY` or "
            "`Authorization: Bearer KEY`.",
            code="missing_api_key",
        )
    store: KeyStore = request.app.state.keys
    # A StoreError becomes a 503 in the error handlers. SQLite lookups take tens of
    # microseconds and never wait for a writer: they run right here, which spares every
    # request a trip through the thread pool. Network databases go through the pool.
    if store.local_reads:
        principal = store.lookup(key)
    else:
        principal = await run_in_threadpool(store.lookup, key)
    if principal is None:
        raise AuthenticationError("Invalid API key.")
    if principal.last_use_is_stale():  # about once a minute per key: a write, off the path
        _touch_later(store, principal.key_id)
    return principal


_pending_touches: set[asyncio.Future[None]] = set()


def _touch_later(store: KeyStore, key_id: str) -> None:
    def done(future: asyncio.Future[None]) -> None:
        _pending_touches.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not record a key's last use: %s", future.exception())

    future = asyncio.get_running_loop().run_in_executor(None, store.touch, key_id)
    _pending_touches.add(future)
    future.add_done_callback(done)


def require_admin(request: Request) -> None:
    """Admin endpoints take only the admin token, as `Authorization: Bearer TOKEN`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Admin endpoints need `Authorization: Bearer ADMIN_TOKEN`.",
                                  code="missing_admin_token")  # fmt: skip
    admin: AdminCredential = request.app.state.admin
    if not admin.verify(token.strip()):  # a StoreError becomes a 503 in the error handlers
        raise AuthenticationError("Invalid admin token.", code="invalid_admin_token")
