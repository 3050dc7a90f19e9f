"""The admin credential: one token, separate from API keys, stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from mimoserve.store.base import Database


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminCredential:
    def __init__(self, db: Database) -> None:
        self._db = db

    def ensure(self) -> str | None:
        """Creates the admin token on first start and returns it (to show once); else None."""
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM admin_credentials").fetchone() is not None:
                return None
        return self.rotate()

    def rotate(self) -> str:
        token = f"mimo-admin-{secrets.token_urlsafe(32)}"
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO admin_credentials (id, token_hash, created_at) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE"
                " SET token_hash = excluded.token_hash, created_at = excluded.created_at",
                (_hash(token), time.time()),
            )
        return token

    def verify(self, token: str) -> bool:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT token_hash FROM admin_credentials").fetchone()
        return row is not None and hmac.compare_digest(row["token_hash"], _hash(token))
