"""/admin: accounts, keys and usage, behind the admin token (never an ordinary key)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from mimoserve.administration import Administration, NewKey
from mimoserve.api.auth import require_admin
from mimoserve.api.body import read_json_model
from mimoserve.auth.keys import AccountInfo, ApiKeyInfo, ConflictError, KeyStore
from mimoserve.billing.budgets import Scope, month_start
from mimoserve.billing.prices import as_money
from mimoserve.billing.service import Budgets, BudgetStatus
from mimoserve.errors import InvalidRequestError, NotFoundError
from mimoserve.limits.policy import Limits
from mimoserve.protocol.admin import (
    AccountView,
    BudgetBody,
    BudgetView,
    CreateAccount,
    CreatedKey,
    CreateKey,
    KeyLimitsBody,
    KeyView,
    LimitsBody,
    LimitsView,
    RequestPage,
    RequestView,
    SpendView,
    UsagePointView,
    UsageRow,
)
from mimoserve.store.usage import LoggedRequest, RequestFilter, SqlUsageStore

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
_BODY_LIMIT = 64 * 1024


def _account_view(account: AccountInfo) -> AccountView:
    return AccountView(
        id=account.id, name=account.name, created_at=account.created_at,
        limits=LimitsView(rpm=account.limits.rpm, tpm=account.limits.tpm),
    )  # fmt: skip


def _key_view(
    key: ApiKeyInfo, spend: SpendView | None = None, budget: BudgetView | None = None
) -> KeyView:
    return KeyView(
        id=key.id, name=key.name, prefix=key.prefix, account_id=key.account_id,
        created_at=key.created_at, last_used_at=key.last_used_at, revoked_at=key.revoked_at,
        expires_at=key.expires_at,
        allowed_models=sorted(key.allowed_models) if key.allowed_models is not None else None,
        limits=LimitsView(**asdict(key.limits)), spend_this_month=spend, budget=budget,
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
    new = NewKey(body.name, account_id, body.expires_in_days, body.allowed_models,
                 Limits(body.rpm, body.tpm, body.max_concurrent))  # fmt: skip
    issued = await run_in_threadpool(_administration(request).create_key, new)
    return CreatedKey(key=issued.secret, info=_key_view(issued.info))


def _administration(request: Request) -> Administration:
    served = [card.id for card in request.app.state.chat.catalogue.list_models().data]
    return Administration(_keys(request), _budgets(request).store, served)


def _budgets(request: Request) -> Budgets:
    budgets: Budgets = request.app.state.budgets
    return budgets


def _currency(request: Request) -> str:
    currency: str = request.app.state.registry.currency
    return currency


@router.get("/keys")
async def list_keys(
    request: Request, account_id: Annotated[str | None, Query()] = None
) -> list[KeyView]:
    """Every key with what it spent this UTC month and, where it has one, its budget."""
    keys = await run_in_threadpool(_keys(request).list, account_id)
    store: SqlUsageStore = request.app.state.usage
    spent = await run_in_threadpool(store.spend_per_key, month_start(time.time()))
    budgets = {s.budget.owner: s for s in await _budgets(request).statuses("key")}
    currency = _currency(request)
    views = []
    for key in keys:
        found = spent.get(key.id)
        spend = SpendView(
            tokens=found.tokens if found else 0,
            cost=as_money(found.cost_micros) if found else 0.0,
            currency=currency,
        )
        status = budgets.get(key.id)
        views.append(_key_view(key, spend, _budget_view(status, currency) if status else None))
    return views


@router.patch("/keys/{key_id}")
async def set_key_limits(key_id: str, request: Request) -> KeyView:
    """The key's own limits (absent or null: none of its own, the account's apply)."""
    body = await read_json_model(request, KeyLimitsBody, _BODY_LIMIT)
    store = _keys(request)
    limits = Limits(body.rpm, body.tpm, body.max_concurrent)
    if not await run_in_threadpool(store.set_key_limits, key_id, limits):
        raise NotFoundError(f"No key with id {key_id!r}.", param="key_id")
    key = await run_in_threadpool(store.key, key_id)
    assert key is not None  # keys are revoked, never deleted
    return _key_view(key)


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
    currency = _currency(request)
    return [
        UsageRow.model_validate({**_with_cost(asdict(row)), "currency": currency}) for row in rows
    ]


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
    return [UsagePointView.model_validate(_with_cost(asdict(point))) for point in points]


def _with_cost(fields: dict[str, object]) -> dict[str, object]:
    micros = fields.pop("cost_micros")
    assert isinstance(micros, int)
    return {**fields, "cost": as_money(micros)}


# ---- budgets -------------------------------------------------------------------------


def _budget_view(status: BudgetStatus, currency: str) -> BudgetView:
    budget, spend = status.budget, status.spend
    scale = (lambda n: float(n)) if budget.unit == "tokens" else as_money
    return BudgetView(
        scope=budget.scope, owner=budget.owner, unit=budget.unit,
        currency=currency if budget.unit == "money" else None, amount=scale(budget.amount),
        period=budget.period, period_start=status.period_start, period_end=status.period_end,
        spent=scale(spend.spent), reserved=scale(spend.reserved),
        remaining=scale(status.remaining), soft_percent=budget.soft_percent,
        over_soft=status.over_soft,
    )  # fmt: skip


@router.get("/budgets")
async def list_budgets(request: Request) -> list[BudgetView]:
    currency = _currency(request)
    return [_budget_view(s, currency) for s in await _budgets(request).statuses()]


@router.get("/budgets/{scope}/{owner}")
async def get_budget(scope: Scope, owner: str, request: Request) -> BudgetView:
    status = await _budgets(request).status_of(scope, owner)
    if status is None:
        raise NotFoundError(f"No budget for {scope} {owner!r}.", param="owner")
    return _budget_view(status, _currency(request))


@router.put("/budgets/{scope}/{owner}")
async def set_budget(scope: Scope, owner: str, request: Request) -> BudgetView:
    """Creates or changes a budget; what was spent in the current period still counts."""
    body = await read_json_model(request, BudgetBody, _BODY_LIMIT)
    budgets = _budgets(request)
    stored = await run_in_threadpool(
        _administration(request).set_budget, scope, owner, body.unit, body.amount, body.period,
        body.soft_percent,
    )  # fmt: skip
    return _budget_view(await budgets.status(stored), _currency(request))


@router.post("/budgets/{scope}/{owner}/reset")
async def reset_budget(scope: Scope, owner: str, request: Request) -> BudgetView:
    """Starts the budget's count afresh from now; the usage records stay as they are."""
    budgets = _budgets(request)
    budget = await run_in_threadpool(budgets.store.reset, scope, owner)
    if budget is None:
        raise NotFoundError(f"No budget for {scope} {owner!r}.", param="owner")
    return _budget_view(await budgets.status(budget), _currency(request))


@router.delete("/budgets/{scope}/{owner}", status_code=204)
async def remove_budget(scope: Scope, owner: str, request: Request) -> Response:
    if not await run_in_threadpool(_budgets(request).store.remove, scope, owner):
        raise NotFoundError(f"No budget for {scope} {owner!r}.", param="owner")
    return Response(status_code=204)


# ---- the request log and exports --------------------------------------------------------

_MAX_PAGE = 200


def _request_view(logged: LoggedRequest) -> RequestView:
    r = logged.record
    return RequestView(
        row=logged.row, time=r.created_at, key_id=r.key_id, account_id=r.account_id,
        model=r.model, door=r.api, status=r.status, prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens, reasoning_tokens=r.reasoning_tokens,
        cached_tokens=r.cached_tokens, ttft_s=r.ttft_s, duration_s=r.latency_s,
        cost=as_money(r.cost_micros), finish_reason=r.finish_reason,
        completion_id=r.request_id, request_id=r.http_request_id,
    )  # fmt: skip


@router.get("/requests")
async def request_log(
    request: Request,
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    status: Annotated[str | None, Query(pattern=r"^([1-5][0-9]{2}|errors)$")] = None,
    hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24.0 * 31,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> RequestPage:
    """Requests newest first, filtered by key, model and status (a code, or `errors`
    for 400 and above); page on with `before` = the previous page's `next_before`."""
    where = RequestFilter(
        key_id=key_id, model=model, since=time.time() - hours * 3600,
        status=int(status) if status and status != "errors" else None,
        errors_only=status == "errors",
    )  # fmt: skip
    store: SqlUsageStore = request.app.state.usage
    # One more than asked: whether an older page exists, without a count.
    found = await run_in_threadpool(store.requests, where, limit + 1, before)
    page = found[:limit]
    return RequestPage(
        data=[_request_view(r) for r in page],
        next_before=page[-1].row if len(found) > limit else None,
    )


_CSV_COLUMNS = ("time_utc", "key_id", "account_id", "model", "door", "status", "prompt_tokens",
                "cached_tokens", "completion_tokens", "reasoning_tokens", "cost", "currency",
                "ttft_s", "duration_s", "finish_reason", "completion_id", "request_id")  # fmt: skip


_CSV_PAGE = 1000  # records read at a time: a long ledger is never held in memory at once


# A cell starting with one of these is a formula to spreadsheet programs (CSV injection):
# a client chooses the model name of a refused request and its x-request-id.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """The value as a spreadsheet shows it, never run as a formula: text that would be one
    gets a leading apostrophe (OWASP's advice). Numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_line(values: list[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([csv_cell(v) for v in values])
    return buffer.getvalue()


class CsvResponse(StreamingResponse):
    media_type = "text/csv"  # what the OpenAPI document states for this route


@router.get("/usage.csv", response_class=CsvResponse,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}})  # fmt: skip
async def usage_csv(
    request: Request, hours: Annotated[float, Query(gt=0, le=24 * 366)] = 24.0 * 31
) -> CsvResponse:
    """Every request of the period, oldest last, one CSV row each (RFC 4180)."""
    store: SqlUsageStore = request.app.state.usage
    currency = _currency(request)
    where = RequestFilter(since=time.time() - hours * 3600)

    async def rows() -> AsyncIterator[str]:
        yield _csv_line(list(_CSV_COLUMNS))
        before = None
        while True:
            page = await run_in_threadpool(store.requests, where, _CSV_PAGE, before)
            for logged in page:
                v = _request_view(logged)
                when = datetime.fromtimestamp(v.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                yield _csv_line([
                    when, v.key_id, v.account_id, v.model, v.door, v.status, v.prompt_tokens,
                    v.cached_tokens, v.completion_tokens, v.reasoning_tokens, f"{v.cost:.6f}",
                    currency, v.ttft_s if v.ttft_s is not None else "", round(v.duration_s, 4),
                    v.finish_reason or "", v.completion_id, v.request_id,
                ])  # fmt: skip
            if len(page) < _CSV_PAGE:
                return
            before = page[-1].row

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return CsvResponse(rows(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="mimoserve-usage-{stamp}.csv"'})  # fmt: skip
