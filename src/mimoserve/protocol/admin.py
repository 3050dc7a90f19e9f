"""Wire models of the admin API (accounts, keys, usage)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LimitsBody(_Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class KeyLimitsBody(LimitsBody):
    max_concurrent: int | None = Field(default=None, ge=1)


class CreateAccount(LimitsBody):
    name: str = Field(min_length=1, max_length=100)


class CreateKey(_Strict):
    name: str = Field(min_length=1, max_length=100)
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)
    allowed_models: list[str] | None = Field(default=None, min_length=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


class BudgetBody(_Strict):
    """`amount` is tokens, or money in the registry's currency (kept to the micro)."""

    unit: Literal["tokens", "money"]
    amount: float = Field(gt=0, le=1e12)
    period: Literal["day", "month", "none"] = "month"
    soft_percent: int = Field(default=80, ge=1, le=100)


class BudgetView(BaseModel):
    """A budget and its current period; amounts in its unit (tokens, or the currency)."""

    scope: Literal["account", "key"]
    owner: str
    unit: Literal["tokens", "money"]
    currency: str | None  # for money budgets
    amount: float
    period: Literal["day", "month", "none"]
    period_start: float
    period_end: float | None
    spent: float
    reserved: float  # requests in flight
    remaining: float
    soft_percent: int
    over_soft: bool


class SpendView(BaseModel):
    tokens: int
    cost: float
    currency: str


class LimitsView(BaseModel):
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None = None


class AccountView(BaseModel):
    id: str
    name: str
    created_at: float
    limits: LimitsView


class KeyView(BaseModel):
    """A key as the admin sees it: never its secret or its hash."""

    id: str
    name: str
    prefix: str
    account_id: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    expires_at: float | None
    allowed_models: list[str] | None
    limits: LimitsView
    spend_this_month: SpendView | None = None  # UTC month, all models
    budget: BudgetView | None = None


class CreatedKey(BaseModel):
    key: str  # the secret, shown this once
    info: KeyView


class UsageRow(BaseModel):
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost: float
    currency: str
    # Speculative decoding: tokens guessed and verified, and those kept.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


class UsagePointView(BaseModel):
    start: float  # unix time of the bucket's start
    model: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


class RequestView(BaseModel):
    """One request as the request log shows it (a usage record)."""

    row: int  # paging cursor: pass the last row as `before` for the next page
    time: float
    key_id: str
    account_id: str
    model: str
    door: str  # chat.completions, messages, responses
    status: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    ttft_s: float | None
    duration_s: float
    cost: float
    finish_reason: str | None
    completion_id: str
    request_id: str  # the x-request-id: find the request's log lines with it


class RequestPage(BaseModel):
    data: list[RequestView]
    next_before: int | None  # None: no older requests
