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
    cost_micros: int
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass(frozen=True)
class UsagePoint:
    """Usage of one model by one key within one time bucket."""

    start: float
    model: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


@dataclass(frozen=True)
class KeySpend:
    key_id: str
    tokens: int
    cost_micros: int


@dataclass(frozen=True)
class RequestFilter:
    """Which records the request log shows; None matches everything."""

    key_id: str | None = None
    model: str | None = None
    status: int | None = None
    errors_only: bool = False  # status 400 and above
    since: float = 0.0


@dataclass(frozen=True)
class LoggedRequest:
    """One usage record with its row number (the request log's paging cursor)."""

    row: int
    record: UsageRecord


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
                " CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens,"
                " CAST(SUM(cost_micros) AS BIGINT) AS cost_micros,"
                " CAST(SUM(draft_tokens) AS BIGINT) AS draft_tokens,"
                " CAST(SUM(accepted_draft_tokens) AS BIGINT) AS accepted_draft_tokens"
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
                " CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,"
                " CAST(SUM(cost_micros) AS BIGINT) AS cost_micros"
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
            completion_tokens=row["completion_tokens"], cost_micros=row["cost_micros"],
        )  # fmt: skip

    def requests(
        self, where: RequestFilter, limit: int = 50, before_row: int | None = None
    ) -> list[LoggedRequest]:
        """Newest first; `before_row` continues from the last row of a previous page."""
        clauses: list[str] = ["created_at >= ?"]
        params: list[object] = [where.since]
        for column, value in (("key_id", where.key_id), ("model", where.model),
                              ("status", where.status)):  # fmt: skip
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.errors_only:
            clauses.append("status >= 400")
        if before_row is not None:
            clauses.append("id < ?")
            params.append(before_row)
        with self._db.reading() as conn:
            rows = conn.execute(
                f"SELECT id, {','.join(_COLUMNS)} FROM usage_records"
                f" WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        found = []
        for row in rows:
            fields = dict(row)
            number = fields.pop("id")
            found.append(LoggedRequest(int(number), UsageRecord(**fields)))
        return found

    def spend_per_key(self, since: float) -> dict[str, KeySpend]:
        with self._db.reading() as conn:
            rows = conn.execute(
                "SELECT key_id, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) AS tokens,"
                " CAST(SUM(cost_micros) AS BIGINT) AS cost_micros"
                " FROM usage_records WHERE created_at >= ? GROUP BY key_id",
                (since,),
            ).fetchall()
        return {row["key_id"]: KeySpend(**dict(row)) for row in rows}
