"""Usage records, in whichever database the server uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

from mimoserve.metering.ledger import UsageRecord
from mimoserve.store.base import Database

_COLUMNS = tuple(f.name for f in fields(UsageRecord))


@dataclass(frozen=True)
class UsageTotal:
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int


class SqlUsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        placeholders = ",".join("?" for _ in _COLUMNS)
        with self._db.transaction() as conn:
            conn.executemany(
                f"INSERT INTO usage_records ({','.join(_COLUMNS)}) VALUES ({placeholders})",
                [astuple(record) for record in records],
            )

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
