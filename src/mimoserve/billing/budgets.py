"""Budgets per account and per key, and where they are kept.

A budget caps what an owner spends over a period: tokens (prompt + completion) or money
(micros of the registry's currency), per UTC day, per UTC month, or in total. The usage
records are the durable truth of what was spent; a keeper (keeper.py, redis_keeper.py)
counts the current period exactly while the server runs, starting from those records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from mimoserve.store.base import Database

Scope = Literal["account", "key"]
Unit = Literal["tokens", "money"]
Period = Literal["day", "month", "none"]
# Counts stay exact integers everywhere, Redis's Lua (doubles) included: 2**53 / 8.
MAX_BUDGET = 2**50
SCOPES: tuple[Scope, ...] = ("account", "key")
UNITS: tuple[Unit, ...] = ("tokens", "money")
PERIODS: tuple[Period, ...] = ("day", "month", "none")


@dataclass(frozen=True)
class Budget:
    scope: Scope
    owner: str  # the account's or the key's id
    unit: Unit
    amount: int  # tokens, or micros of the registry's currency
    period: Period
    soft_percent: int = 80  # past this share the budget is flagged (dashboard, /metrics)
    reset_at: float = 0.0  # counting starts here if later than the period's start

    def starts(self, now: float) -> float:
        """When the period that holds `now` began (or the last reset, if later)."""
        if self.period == "day":
            begun = day_start(now)
        elif self.period == "month":
            begun = month_start(now)
        else:
            begun = 0.0
        return max(begun, self.reset_at)

    def ends(self, now: float) -> float | None:
        """When the period that holds `now` ends; None for a budget that never resets."""
        if self.period == "day":
            return day_start(now) + 86400
        if self.period == "month":
            moment = datetime.fromtimestamp(now, UTC)
            after = moment.year * 12 + moment.month  # the next month, counted from year 0
            return datetime(after // 12, after % 12 + 1, 1, tzinfo=UTC).timestamp()
        return None

    def counter(self, now: float) -> str:
        """Names the count of one period: a new period (or a reset) starts a new count."""
        return f"{self.scope}:{self.owner}:{self.unit}:{int(self.starts(now) * 1000)}"

    def charge(self, tokens: int, cost_micros: int) -> int:
        """What a request's use counts against this budget."""
        return tokens if self.unit == "tokens" else cost_micros

    def over_soft(self, spent: int) -> bool:
        """Whether `spent` has passed the soft threshold (flagged, never refused)."""
        return spent >= self.amount * self.soft_percent / 100


def day_start(now: float) -> float:
    """Midnight UTC of the day that holds `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_start(now: float) -> float:
    """Midnight UTC of the first day of the month that holds `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


@dataclass(frozen=True)
class Spend:
    """One budget's current period: settled use and what requests in flight reserved."""

    spent: int
    reserved: int

    def remaining(self, budget: Budget) -> int:
        return budget.amount - self.spent - self.reserved


def _budget(row: Any) -> Budget:
    return Budget(
        scope=row["scope"], owner=row["owner"], unit=row["unit"], amount=int(row["amount"]),
        period=row["period"], soft_percent=int(row["soft_percent"]),
        reset_at=float(row["reset_at"]),
    )  # fmt: skip


_CACHE_S = 1.0  # budgets change rarely; another replica's change shows within a second


class BudgetStore:
    """Budgets in the server's database; the usage records tell what was spent."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cache: tuple[float, dict[tuple[str, str], Budget]] | None = None

    def set(self, budget: Budget) -> Budget:
        """Creates or changes the owner's budget; spend so far in its period still counts."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT reset_at FROM budgets WHERE scope = ? AND owner = ?",
                (budget.scope, budget.owner),
            ).fetchone()
            if row is not None:
                budget = replace(budget, reset_at=float(row["reset_at"]))
                conn.execute(
                    "UPDATE budgets SET unit = ?, amount = ?, period = ?, soft_percent = ?"
                    " WHERE scope = ? AND owner = ?",
                    (budget.unit, budget.amount, budget.period, budget.soft_percent,
                     budget.scope, budget.owner),
                )  # fmt: skip
            else:
                conn.execute(
                    "INSERT INTO budgets (scope, owner, unit, amount, period, soft_percent,"
                    " reset_at) VALUES (?,?,?,?,?,?,?)",
                    (budget.scope, budget.owner, budget.unit, budget.amount, budget.period,
                     budget.soft_percent, budget.reset_at),
                )  # fmt: skip
        self._cache = None
        return budget

    def remove(self, scope: Scope, owner: str) -> bool:
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM budgets WHERE scope = ? AND owner = ?", (scope, owner)
            )
        self._cache = None
        return cursor.rowcount == 1

    def reset(self, scope: Scope, owner: str, now: float | None = None) -> Budget | None:
        """Starts the budget's count afresh from now (what was spent stays recorded)."""
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE budgets SET reset_at = ? WHERE scope = ? AND owner = ?",
                (time.time() if now is None else now, scope, owner),
            )
        self._cache = None
        return self.get(scope, owner) if cursor.rowcount == 1 else None

    def get(self, scope: Scope, owner: str) -> Budget | None:
        return self._all().get((scope, owner))

    def all(self) -> list[Budget]:
        return sorted(self._all().values(), key=lambda b: (b.scope, b.owner))

    def applying(self, account_id: str, key_id: str) -> list[Budget]:
        """The budgets a request of this key draws from (its account's, its own)."""
        found = self._all()
        return [
            budget
            for budget in (found.get(("account", account_id)), found.get(("key", key_id)))
            if budget is not None
        ]

    def _all(self) -> dict[tuple[str, str], Budget]:
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < _CACHE_S:
            return self._cache[1]
        with self._db.reading() as conn:
            rows = conn.execute("SELECT * FROM budgets").fetchall()
        found = {(row["scope"], row["owner"]): _budget(row) for row in rows}
        self._cache = (now, found)
        return found

    def spent_since(self, budget: Budget, since: float) -> int:
        """What the recorded usage of the budget's owner adds up to since `since`."""
        column = "account_id" if budget.scope == "account" else "key_id"
        measure = "prompt_tokens + completion_tokens" if budget.unit == "tokens" else "cost_micros"
        with self._db.reading() as conn:
            row = conn.execute(
                f"SELECT CAST(COALESCE(SUM({measure}), 0) AS BIGINT) AS spent"
                f" FROM usage_records WHERE {column} = ? AND created_at >= ?",
                (budget.owner, since),
            ).fetchone()
        return int(row["spent"])
