"""What the stores need from a database, whichever engine holds it.

Queries are written once, with `?` placeholders and SQL that SQLite and PostgreSQL
both accept; each engine's adapter translates placeholders and turns its driver's
exceptions into the two below, so no caller imports a driver.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


class StoreError(Exception):
    """The store could not be read or written (not the caller's fault: a 503)."""


class ConstraintError(Exception):
    """A write broke a uniqueness or integrity constraint."""

    refused_for_content = True  # writing the same data again fails again (metering reads it)


class RecordRefusedError(StoreError):
    """The store is up but refuses this data for its content (a value out of range, a
    character it cannot hold): writing it again will fail again."""

    refused_for_content = True


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """Rows read by column name: `row["id"]`, `dict(row)`."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Cursor: ...


class Database(Protocol):
    dialect: str  # "sqlite" or "postgresql"
    local_reads: bool  # True: `reading()` is fast and local enough for the event loop

    def transaction(self) -> AbstractContextManager[Connection]: ...

    def reading(self) -> AbstractContextManager[Connection]:
        """For queries that only read: may skip the write lock and see committed data."""
        ...

    def close(self) -> None: ...
