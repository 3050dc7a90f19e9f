"""Accounts and their API keys: issued once, stored only as a hash, checked in constant time.

A key looks like `mimo-<id>_<secret>`. The id is not secret and finds the row; the
whole key is hashed with SHA-256 and compared with `hmac.compare_digest`. Keys carry
256 bits of randomness, so a fast hash is enough (slow KDFs exist for guessable
passwords) and keeps authentication off the critical path. Revocation and expiry are
read on every request, so they take effect on the next one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from mimoserve.limits.policy import Limits
from mimoserve.store.base import ConstraintError, Database

_KEY_PATTERN = re.compile(r"^mimo-([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
# Writing last_used on every request would turn each read into a write; a minute is precise enough.
_LAST_USED_RESOLUTION_S = 60.0
DEFAULT_ACCOUNT = "default"
NO_LIMITS = Limits()


class ConflictError(Exception):
    """A name that must be unique is taken."""


@dataclass(frozen=True)
class AccountInfo:
    id: str
    name: str
    created_at: float
    limits: Limits


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    account_id: str = DEFAULT_ACCOUNT
    expires_at: float | None = None
    allowed_models: frozenset[str] | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that authenticated the request, and what it may do."""

    key_id: str
    key_name: str
    account_id: str = DEFAULT_ACCOUNT
    allowed_models: frozenset[str] | None = None  # None: every model
    account_limits: Limits = field(default_factory=Limits)
    key_limits: Limits = field(default_factory=Limits)
    last_used_at: float | None = field(default=None, compare=False)

    def last_use_is_stale(self) -> bool:
        last = self.last_used_at
        return last is None or last < time.time() - _LAST_USED_RESOLUTION_S


@dataclass(frozen=True)
class IssuedKey:
    info: ApiKeyInfo
    secret: str  # the full key: shown once, never stored


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _limits(row: Any, prefix: str = "") -> Limits:
    columns = set(row.keys())

    def get(name: str) -> int | None:
        value = row[prefix + name] if prefix + name in columns else None
        return None if value is None else int(value)

    return Limits(rpm=get("rpm"), tpm=get("tpm"), max_concurrent=get("max_concurrent"))


def _models(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(json.loads(text))


def _key_info(row: Any) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row["id"], name=row["name"], prefix=row["prefix"], created_at=row["created_at"],
        last_used_at=row["last_used_at"], revoked_at=row["revoked_at"],
        account_id=row["account_id"], expires_at=row["expires_at"],
        allowed_models=_models(row["allowed_models"]), limits=_limits(row),
    )  # fmt: skip


_KEY_COLUMNS = (
    "id, name, prefix, created_at, last_used_at, revoked_at, account_id, expires_at,"
    " allowed_models, rpm, tpm, max_concurrent"
)


class KeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- accounts ------------------------------------------------------------------

    def create_account(self, name: str, limits: Limits = NO_LIMITS) -> AccountInfo:
        account = AccountInfo(secrets.token_hex(6), name, time.time(), limits)
        try:
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT INTO accounts (id, name, created_at, rpm, tpm) VALUES (?,?,?,?,?)",
                    (account.id, name, account.created_at, limits.rpm, limits.tpm),
                )
        except ConstraintError as exc:
            raise ConflictError(f"an account named {name!r} exists") from exc
        return account

    def accounts(self) -> list[AccountInfo]:
        with self._db.transaction() as conn:
            rows = conn.execute("SELECT * FROM accounts ORDER BY created_at").fetchall()
        return [AccountInfo(r["id"], r["name"], r["created_at"], _limits(r)) for r in rows]

    def account(self, account_id: str) -> AccountInfo | None:
        with self._db.transaction() as conn:
            r = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return None if r is None else AccountInfo(r["id"], r["name"], r["created_at"], _limits(r))

    def set_account_limits(self, account_id: str, limits: Limits) -> bool:
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE accounts SET rpm = ?, tpm = ? WHERE id = ?",
                (limits.rpm, limits.tpm, account_id),
            )
        return cursor.rowcount == 1

    # ---- keys ------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        account_id: str = DEFAULT_ACCOUNT,
        expires_at: float | None = None,
        allowed_models: frozenset[str] | None = None,
        limits: Limits = NO_LIMITS,
    ) -> IssuedKey:
        key_id = secrets.token_hex(6)
        key = f"mimo-{key_id}_{secrets.token_urlsafe(32)}"
        info = ApiKeyInfo(
            id=key_id, name=name, prefix=key[:13], created_at=time.time(), last_used_at=None,
            revoked_at=None, account_id=account_id, expires_at=expires_at,
            allowed_models=allowed_models, limits=limits,
        )  # fmt: skip
        models = None if allowed_models is None else json.dumps(sorted(allowed_models))
        with self._db.transaction() as conn:
            if (
                conn.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone()
                is None
            ):
                raise KeyError(account_id)
            conn.execute(
                "INSERT INTO api_keys (id, name, prefix, key_hash, created_at, account_id,"
                " expires_at, allowed_models, rpm, tpm, max_concurrent)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (key_id, name, info.prefix, _hash(key), info.created_at, account_id, expires_at,
                 models, limits.rpm, limits.tpm, limits.max_concurrent),
            )  # fmt: skip
        return IssuedKey(info, key)

    def list(self, account_id: str | None = None) -> list[ApiKeyInfo]:
        query = f"SELECT {_KEY_COLUMNS} FROM api_keys"
        params: tuple[str, ...] = ()
        if account_id is not None:
            query, params = query + " WHERE account_id = ?", (account_id,)
        with self._db.transaction() as conn:
            rows = conn.execute(query + " ORDER BY created_at", params).fetchall()
        return [_key_info(row) for row in rows]

    def key(self, key_id: str) -> ApiKeyInfo | None:
        """The key with this id, revoked or not."""
        with self._db.reading() as conn:
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        return None if row is None else _key_info(row)

    def count_active(self) -> int:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL"
            ).fetchone()
        return int(row["n"])

    def set_key_limits(self, key_id: str, limits: Limits) -> bool:
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET rpm = ?, tpm = ?, max_concurrent = ? WHERE id = ?",
                (limits.rpm, limits.tpm, limits.max_concurrent, key_id),
            )
        return cursor.rowcount == 1

    def revoke(self, id_or_prefix: str) -> bool:
        key_id = id_or_prefix.removeprefix("mimo-")
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount == 1

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, revoked or expired key.

        Raises StoreError when the store cannot answer (a 503 for the caller, not a 401).
        """
        principal = self.lookup(key)
        if principal is not None and principal.last_use_is_stale():
            self.touch(principal.key_id)
        return principal

    @property
    def local_reads(self) -> bool:
        return self._db.local_reads

    @property
    def database(self) -> Database:
        return self._db

    def lookup(self, key: str) -> Principal | None:
        """`authenticate` without recording the use: reads only (see `touch`)."""
        match = _KEY_PATTERN.match(key)
        if match is None:
            return None
        key_id = match.group(1)
        with self._db.reading() as conn:
            row = conn.execute(
                "SELECT k.name, k.key_hash, k.revoked_at, k.expires_at, k.account_id,"
                " k.allowed_models, k.rpm, k.tpm, k.max_concurrent, k.last_used_at,"
                " a.rpm AS account_rpm, a.tpm AS account_tpm"
                " FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = ?",
                (key_id,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row["key_hash"], _hash(key)):
            return None
        if row["revoked_at"] is not None:
            return None
        if row["expires_at"] is not None and row["expires_at"] <= time.time():
            return None
        return Principal(
            key_id=key_id,
            key_name=row["name"],
            account_id=row["account_id"],
            allowed_models=_models(row["allowed_models"]),
            account_limits=_limits(row, "account_"),
            key_limits=_limits(row),
            last_used_at=row["last_used_at"],
        )

    def touch(self, key_id: str) -> None:
        """Records a use of the key (at most once per minute: see _LAST_USED_RESOLUTION_S)."""
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
                (now, key_id, now - _LAST_USED_RESOLUTION_S),
            )
