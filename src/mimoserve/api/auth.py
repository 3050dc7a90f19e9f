"""The auth dependency: `api-key: KEY` or `Authorization: Bearer KEY` -> Principal."""

from __future__ import annotations

from fastapi import Request

from mimoserve.auth.admin import AdminCredential
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
    principal = store.authenticate(key)  # a StoreError becomes a 503 in the error handlers
    if principal is None:
        raise AuthenticationError("Invalid API key.")
    return principal


def require_admin(request: Request) -> None:
    """Admin endpoints take only the admin token, as `Authorization: Bearer TOKEN`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Admin endpoints need `Authorization: Bearer ADMIN_TOKEN`.",
                                  code="missing_admin_token")  # fmt: skip
    admin: AdminCredential = request.app.state.admin
    if not admin.verify(token.strip()):  # a StoreError becomes a 503 in the error handlers
        raise AuthenticationError("Invalid admin token.", code="invalid_admin_token")
