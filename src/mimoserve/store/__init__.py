"""Persistence: SQLite by default, PostgreSQL when several replicas share state."""

from __future__ import annotations

from pathlib import Path

from mimoserve.store.base import Database


def open_database(url: str | None, default_path: Path) -> Database:
    """`postgresql://...` opens PostgreSQL; `sqlite:///path` or None opens a SQLite file."""
    if url is None:
        from mimoserve.store.sqlite import SqliteDatabase

        return SqliteDatabase(default_path)
    if url.startswith(("postgresql://", "postgres://")):
        from mimoserve.store.postgres import PostgresDatabase

        return PostgresDatabase(url)
    if url.startswith("sqlite:///"):
        from mimoserve.store.sqlite import SqliteDatabase

        return SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    raise ValueError(
        f"unsupported database URL {url.split(':', 1)[0]!r}: use postgresql:// or sqlite:///"
    )
