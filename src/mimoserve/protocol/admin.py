"""Wire models of the admin API (accounts, keys, usage)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LimitsBody(_Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class CreateAccount(LimitsBody):
    name: str = Field(min_length=1, max_length=100)


class CreateKey(_Strict):
    name: str = Field(min_length=1, max_length=100)
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)
    allowed_models: list[str] | None = Field(default=None, min_length=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


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


class UsagePointView(BaseModel):
    start: float  # unix time of the bucket's start
    model: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
