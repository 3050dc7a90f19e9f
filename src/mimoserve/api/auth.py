"""The auth dependency: `api-key: KEY` or `Authorization: Bearer KEY` -> Principal."""

from __future__ import annotations

from fastapi import Request

from mimoserve.auth.keys import KeyStore, Principal
from mimoserve.errors import AuthenticationError


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def require_principal(request: Request) -> Principal:
    # A plain `def`: FastAPI runs it in its thread pool, so the SQLite lookup never
    # blocks the event loop.
    key = _presented_key(request)
    if key is None:
        raise AuthenticationError(
            "Missing API key: send it as `api-key: KEY` or `Authorization: Bearer KEY`.",
            code="missing_api_key",
        )
    store: KeyStore = request.app.state.keys
    principal = store.authenticate(key)
    if principal is None:
        raise AuthenticationError("Invalid API key.")
    return principal
