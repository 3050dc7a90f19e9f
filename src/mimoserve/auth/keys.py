"""API keys: issued once, stored only as a hash, checked in constant time.

A key looks like `mimo-<id>_<secret>`. The id is not secret and finds the row; the
whole key is hashed with SHA-256 and compared with `hmac.compare_digest`. Keys carry
256 bits of randomness, so a fast hash is enough (slow KDFs exist for guessable
passwords) and keeps authentication off the critical path.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from mimoserve.store.sqlite import Database

_KEY_PATTERN = re.compile(r"^mimo-([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
# Writing last_used on every request would turn each read into a write; a minute is precise enough.
_LAST_USED_RESOLUTION_S = 60.0


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that authenticated the request."""

    key_id: str
    key_name: str


@dataclass(frozen=True)
class IssuedKey:
    info: ApiKeyInfo
    secret: str  # the full key: shown once, never stored


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str) -> IssuedKey:
        key_id = secrets.token_hex(6)
        key = f"mimo-{key_id}_{secrets.token_urlsafe(32)}"
        prefix = key[:13]
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, prefix, key_hash, created_at) VALUES (?,?,?,?,?)",
                (key_id, name, prefix, _hash(key), now),
            )
        return IssuedKey(ApiKeyInfo(key_id, name, prefix, now, None, None), key)

    def list(self) -> list[ApiKeyInfo]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, name, prefix, created_at, last_used_at, revoked_at"
                " FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKeyInfo(**dict(row)) for row in rows]

    def count_active(self) -> int:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()
        return int(row[0])

    def revoke(self, id_or_prefix: str) -> bool:
        key_id = id_or_prefix.removeprefix("mimo-")
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount == 1

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown or revoked key."""
        match = _KEY_PATTERN.match(key)
        if match is None:
            return None
        key_id = match.group(1)
        now = time.time()
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT name, key_hash, revoked_at FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
            if row is None or not hmac.compare_digest(row["key_hash"], _hash(key)):
                return None
            if row["revoked_at"] is not None:
                return None
            conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
                (now, key_id, now - _LAST_USED_RESOLUTION_S),
            )
        return Principal(key_id=key_id, key_name=row["name"])
