"""PostgreSQL persistence for shared deployments: several server processes, one database.

A connection pool (psycopg_pool) hands each transaction its own connection and checks
it before use, so a database restart costs the requests in flight, not the process.
Migrations run under an advisory lock: replicas that start together migrate once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from mimoserve.store.base import ConstraintError, RecordRefusedError, StoreError

# The schema as SQLite reaches it after its migrations, in PostgreSQL's types: DOUBLE
# PRECISION for times (REAL is 4 bytes here) and BIGINT identities. Each entry moves the
# schema one version up; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        rpm INTEGER,
        tpm INTEGER
    );
    INSERT INTO accounts (id, name, created_at) VALUES ('default', 'default', 0);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_used_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION,
        account_id TEXT NOT NULL DEFAULT 'default',
        expires_at DOUBLE PRECISION,
        allowed_models TEXT,
        rpm INTEGER,
        tpm INTEGER,
        max_concurrent INTEGER
    );
    CREATE TABLE usage_records (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        key_id TEXT NOT NULL,
        account_id TEXT NOT NULL DEFAULT 'default',
        request_id TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        latency_s DOUBLE PRECISION NOT NULL,
        ttft_s DOUBLE PRECISION,
        finish_reason TEXT
    );
    CREATE INDEX usage_records_time ON usage_records (created_at);
    CREATE INDEX usage_records_key ON usage_records (key_id, created_at);
    CREATE TABLE admin_credentials (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        token_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    ALTER TABLE usage_records ADD COLUMN record_id TEXT;
    CREATE UNIQUE INDEX usage_records_record_id ON usage_records (record_id);
    """,
    # Which front door the request came through (chat.completions, messages, responses).
    """
    ALTER TABLE usage_records ADD COLUMN api TEXT NOT NULL DEFAULT 'chat.completions';
    """,
    # The HTTP request id (x-request-id), to trace a record to its log lines.
    """
    ALTER TABLE usage_records ADD COLUMN http_request_id TEXT NOT NULL DEFAULT '';
    """,
    # The cost of each record (micros of the registry's currency) and budgets per
    # account and key; `reset_at` restarts a budget's count without waiting for its window.
    """
    ALTER TABLE usage_records ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX usage_records_account ON usage_records (account_id, created_at);
    CREATE TABLE budgets (
        scope TEXT NOT NULL,
        owner TEXT NOT NULL,
        unit TEXT NOT NULL,
        amount BIGINT NOT NULL,
        period TEXT NOT NULL,
        soft_percent INTEGER NOT NULL,
        reset_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, owner)
    );
    """,
    # Whether a record's tokens were counted by the engine or estimated by the server.
    """
    ALTER TABLE usage_records ADD COLUMN usage_source TEXT NOT NULL DEFAULT 'engine';
    """,
    # Speculative decoding's guessed and accepted tokens per request.
    """
    ALTER TABLE usage_records ADD COLUMN draft_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN accepted_draft_tokens INTEGER NOT NULL DEFAULT 0;
    """,
    # Speech: seconds of audio heard or spoken, and characters spoken, per request.
    """
    ALTER TABLE usage_records ADD COLUMN audio_seconds DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    """,
)
_MIGRATION_LOCK = 0x6D696D6F  # any constant shared by every replica


def _placeholders(sql: str) -> str:
    # Shared queries use `?`; none of them contains a literal `?` or `%`.
    return sql.replace("?", "%s")


class _Connection:
    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[dict[str, Any]]:
        # No parameters: the simple protocol, which also runs a multi-statement script.
        return self._conn.execute(_placeholders(sql), params or None)

    def executemany(
        self, sql: str, params: Iterable[Sequence[Any]], /
    ) -> psycopg.Cursor[dict[str, Any]]:
        cursor = self._conn.cursor()
        cursor.executemany(_placeholders(sql), params)
        return cursor


class PostgresDatabase:
    dialect = "postgresql"
    local_reads = False  # every query is a network round trip: keep it off the event loop

    def __init__(self, url: str, *, max_connections: int = 8, timeout_s: float = 5.0) -> None:
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            kwargs={"row_factory": dict_row},
            min_size=1,
            max_size=max_connections,
            timeout=timeout_s,
            check=ConnectionPool.check_connection,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(f"postgresql: cannot connect within {timeout_s} s") from exc
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) AS version FROM schema_version").fetchone()
            version = (row or {}).get("version") or 0
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(script)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    @contextmanager
    def transaction(self) -> Iterator[_Connection]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _Connection(conn)
        except psycopg.errors.IntegrityError as exc:
            raise ConstraintError(str(exc)) from exc
        except psycopg.DataError as exc:
            # A value PostgreSQL will not hold (NUL in text, out of range): the data.
            raise RecordRefusedError(f"postgresql: {exc}") from exc
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"postgresql: {exc}") from exc

    def reading(self) -> AbstractContextManager[_Connection]:
        return self.transaction()

    def close(self) -> None:
        self._pool.close()
