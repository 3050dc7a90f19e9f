"""Usage records, in whichever database the server uses."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from mimoserve.metering.ledger import UsageRecord
from mimoserve.store.base import Database

_COLUMNS = tuple(f.name for f in fields(UsageRecord))
# Not dataclasses.astuple: it deep-copies every field (a tenth of a busy relay's CPU).
_VALUES = operator.attrgetter(*_COLUMNS)


@dataclass(frozen=True)
class UsageTotal:
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class UsagePoint:
    """Usage of one model by one key within one time bucket."""

    start: float
    model: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class SqlUsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        """Writes the records; one already written (same `record_id`) is skipped."""
        placeholders = ",".join("?" for _ in _COLUMNS)
        columns = ",".join(_COLUMNS)
        insert = (
            f"INSERT OR IGNORE INTO usage_records ({columns}) VALUES ({placeholders})"
            if self._db.dialect == "sqlite"
            else f"INSERT INTO usage_records ({columns}) VALUES ({placeholders})"
            " ON CONFLICT (record_id) DO NOTHING"
        )
        with self._db.transaction() as conn:
            conn.executemany(insert, [_VALUES(record) for record in records])

    def records(self, since: float = 0.0) -> list[UsageRecord]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {','.join(_COLUMNS)} FROM usage_records WHERE created_at >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return [UsageRecord(**dict(row)) for row in rows]

    def totals(self, since: float = 0.0) -> list[UsageTotal]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                # CASTs: PostgreSQL sums integers as NUMERIC, which the driver reads as Decimal.
                "SELECT key_id, model, COUNT(*) AS requests,"
                " CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,"
                " CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,"
                " CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens,"
                " CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens"
                " FROM usage_records WHERE created_at >= ? GROUP BY key_id, model"
                " ORDER BY key_id, model",
                (since,),
            ).fetchall()
        return [UsageTotal(**dict(row)) for row in rows]

    def series(self, since: float, step_s: float) -> list[UsagePoint]:
        # Bucket number: PostgreSQL's CAST rounds, SQLite's truncates (times are positive).
        bucket = "FLOOR(created_at / ?)" if self._db.dialect == "postgresql" else (
            "CAST(created_at / ? AS INTEGER)"
        )  # fmt: skip
        with self._db.transaction() as conn:
            rows = conn.execute(
                f"SELECT CAST({bucket} AS BIGINT) AS bucket, model, key_id,"
                " COUNT(*) AS requests, CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,"
                " CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens"
                " FROM usage_records WHERE created_at >= ?"
                " GROUP BY 1, model, key_id ORDER BY 1, model, key_id",
                (step_s, since),
            ).fetchall()
        return [self._point(row, step_s) for row in rows]

    @staticmethod
    def _point(row: Any, step_s: float) -> UsagePoint:
        return UsagePoint(
            start=row["bucket"] * step_s, model=row["model"], key_id=row["key_id"],
            requests=row["requests"], prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
        )  # fmt: skip
