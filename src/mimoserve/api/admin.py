"""/admin: accounts, keys and usage, behind the admin token (never an ordinary key)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from mimoserve.api.auth import require_admin
from mimoserve.api.body import read_json_model
from mimoserve.auth.keys import AccountInfo, ApiKeyInfo, ConflictError, KeyStore
from mimoserve.errors import InvalidRequestError, NotFoundError
from mimoserve.limits.policy import Limits
from mimoserve.protocol.admin import (
    AccountView,
    CreateAccount,
    CreatedKey,
    CreateKey,
    KeyView,
    LimitsBody,
    LimitsView,
    UsagePointView,
    UsageRow,
)
from mimoserve.store.usage import SqlUsageStore

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
_BODY_LIMIT = 64 * 1024


def _account_view(account: AccountInfo) -> AccountView:
    return AccountView(
        id=account.id, name=account.name, created_at=account.created_at,
        limits=LimitsView(rpm=account.limits.rpm, tpm=account.limits.tpm),
    )  # fmt: skip


def _key_view(key: ApiKeyInfo) -> KeyView:
    return KeyView(
        id=key.id, name=key.name, prefix=key.prefix, account_id=key.account_id,
        created_at=key.created_at, last_used_at=key.last_used_at, revoked_at=key.revoked_at,
        expires_at=key.expires_at,
        allowed_models=sorted(key.allowed_models) if key.allowed_models is not None else None,
        limits=LimitsView(**asdict(key.limits)),
    )  # fmt: skip


def _keys(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _existing_account(store: KeyStore, account_id: str) -> AccountInfo:
    account = store.account(account_id)
    if account is None:
        raise NotFoundError(f"No account with id {account_id!r}.", param="account_id")
    return account


@router.get("/accounts")
async def list_accounts(request: Request) -> list[AccountView]:
    accounts = await run_in_threadpool(_keys(request).accounts)
    return [_account_view(a) for a in accounts]


@router.post("/accounts", status_code=201)
async def create_account(request: Request) -> AccountView:
    body = await read_json_model(request, CreateAccount, _BODY_LIMIT)
    try:
        account = await run_in_threadpool(
            _keys(request).create_account, body.name, Limits(body.rpm, body.tpm)
        )
    except ConflictError as exc:
        raise InvalidRequestError(str(exc), param="name", code="name_taken") from exc
    return _account_view(account)


@router.get("/accounts/{account_id}")
async def get_account(account_id: str, request: Request) -> AccountView:
    return _account_view(await run_in_threadpool(_existing_account, _keys(request), account_id))


@router.patch("/accounts/{account_id}")
async def set_account_limits(account_id: str, request: Request) -> AccountView:
    body = await read_json_model(request, LimitsBody, _BODY_LIMIT)
    store = _keys(request)
    if not await run_in_threadpool(
        store.set_account_limits, account_id, Limits(body.rpm, body.tpm)
    ):
        raise NotFoundError(f"No account with id {account_id!r}.", param="account_id")
    return _account_view(await run_in_threadpool(_existing_account, store, account_id))


@router.post("/accounts/{account_id}/keys", status_code=201)
async def create_key(account_id: str, request: Request) -> CreatedKey:
    body = await read_json_model(request, CreateKey, _BODY_LIMIT)
    store = _keys(request)
    await run_in_threadpool(_existing_account, store, account_id)
    served = {card.id for card in request.app.state.chat.list_models().data}
    unknown = sorted(set(body.allowed_models or ()) - served)
    if unknown:
        raise InvalidRequestError(f"Unknown models: {', '.join(unknown)}.", param="allowed_models")
    expires = time.time() + body.expires_in_days * 86400 if body.expires_in_days else None
    issued = await run_in_threadpool(
        lambda: store.create(
            body.name,
            account_id=account_id,
            expires_at=expires,
            allowed_models=frozenset(body.allowed_models) if body.allowed_models else None,
            limits=Limits(body.rpm, body.tpm, body.max_concurrent),
        )
    )
    return CreatedKey(key=issued.secret, info=_key_view(issued.info))


@router.get("/keys")
async def list_keys(
    request: Request, account_id: Annotated[str | None, Query()] = None
) -> list[KeyView]:
    keys = await run_in_threadpool(_keys(request).list, account_id)
    return [_key_view(k) for k in keys]


@router.delete("/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, request: Request) -> Response:
    if not await run_in_threadpool(_keys(request).revoke, key_id):
        raise NotFoundError(f"No active key with id {key_id!r}.", param="key_id")
    return Response(status_code=204)


@router.get("/usage")
async def usage(
    request: Request, hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24.0
) -> list[UsageRow]:
    store: SqlUsageStore = request.app.state.usage
    rows = await run_in_threadpool(store.totals, time.time() - hours * 3600)
    return [UsageRow(**asdict(row)) for row in rows]


@router.get("/usage/series")
async def usage_series(
    request: Request,
    hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24.0,
    step_s: Annotated[float, Query(ge=60, le=86400 * 31)] = 3600.0,
) -> list[UsagePointView]:
    """Usage per model and key in buckets of `step_s` seconds (the dashboard's charts)."""
    store: SqlUsageStore = request.app.state.usage
    if hours * 3600 / step_s > 10_000:
        raise InvalidRequestError("At most 10000 buckets: raise step_s.", param="step_s")
    points = await run_in_threadpool(store.series, time.time() - hours * 3600, step_s)
    return [UsagePointView(**asdict(point)) for point in points]
