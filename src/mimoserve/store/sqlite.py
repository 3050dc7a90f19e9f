"""SQLite persistence (one file, WAL) with numbered migrations."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mimoserve.store.base import ConstraintError, RecordRefusedError, StoreError

# Each entry moves the schema one version up; never edit a released entry, append a new one
# (and the same change to the PostgreSQL schema in store/postgres.py).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    """,
    """
    CREATE TABLE usage_records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        latency_s REAL NOT NULL,
        ttft_s REAL,
        finish_reason TEXT
    );
    CREATE INDEX usage_records_time ON usage_records (created_at);
    CREATE INDEX usage_records_key ON usage_records (key_id, created_at);
    """,
    """
    CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        rpm INTEGER,
        tpm INTEGER
    );
    INSERT INTO accounts (id, name, created_at) VALUES ('default', 'default', 0);
    ALTER TABLE api_keys ADD COLUMN account_id TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE api_keys ADD COLUMN expires_at REAL;
    ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
    ALTER TABLE api_keys ADD COLUMN rpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN tpm INTEGER;
    ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER;
    ALTER TABLE usage_records ADD COLUMN account_id TEXT NOT NULL DEFAULT 'default';
    CREATE TABLE admin_credentials (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        token_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE usage_records ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
    """,
    # Every record carries a unique id, so a record replayed from the crash journal
    # after it had already been written is not counted twice.
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
    ALTER TABLE usage_records ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX usage_records_account ON usage_records (account_id, created_at);
    CREATE TABLE budgets (
        scope TEXT NOT NULL,
        owner TEXT NOT NULL,
        unit TEXT NOT NULL,
        amount INTEGER NOT NULL,
        period TEXT NOT NULL,
        soft_percent INTEGER NOT NULL,
        reset_at REAL NOT NULL DEFAULT 0,
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
    ALTER TABLE usage_records ADD COLUMN audio_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN characters INTEGER NOT NULL DEFAULT 0;
    """,
)


class SqliteDatabase:
    """Writes go through one connection serialised by a lock (SQLite serialises writes
    anyway). Reads use a connection per thread and take no lock: in WAL mode they never
    wait for a writer and see every committed write, so a key lookup costs tens of
    microseconds and can run on the event loop."""

    dialect = "sqlite"
    local_reads = True  # reads are cheap enough to run on the event loop

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                raise ConstraintError(str(exc)) from exc
            except (sqlite3.DataError, sqlite3.InterfaceError, OverflowError) as exc:
                # A value SQLite cannot bind or hold: the data, not the database.
                raise RecordRefusedError(f"sqlite: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {exc}") from exc

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        try:
            if conn is None:
                conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA query_only=1")
                conn.execute("PRAGMA busy_timeout=5000")
                self._readers.conn = conn
                with self._lock:
                    self._reader_connections.append(conn)
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for conn in self._reader_connections:
                conn.close()
            self._conn.close()


Database = SqliteDatabase  # the default engine, under the name most callers use
