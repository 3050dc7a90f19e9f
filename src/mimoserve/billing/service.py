"""Budgets as the chat core and the admin see them: which apply to a request, what is
left of each, and the gauges /metrics shows."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mimoserve.billing.budgets import Budget, BudgetStore, Scope, Spend
from mimoserve.billing.keeper import BudgetHold, BudgetKeeper, Usage
from mimoserve.metering.metrics import Metrics


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    spend: Spend
    period_start: float
    period_end: float | None

    @property
    def remaining(self) -> int:
        return max(0, self.spend.remaining(self.budget))

    @property
    def over_soft(self) -> bool:
        return self.budget.over_soft(self.spend.spent)


def report(metrics: Metrics, budget: Budget, spend: Spend) -> None:
    """Sets the budget's gauges (the soft threshold is what alerts watch)."""
    metrics.budget_flag(budget.scope, budget.owner, budget.over_soft(spend.spent))


class Budgets:
    def __init__(self, store: BudgetStore, keeper: BudgetKeeper, local_reads: bool) -> None:
        self.store = store
        self.keeper = keeper
        self._local_reads = local_reads  # else the store's reads go to a thread

    async def _applying(self, account_id: str, key_id: str) -> list[Budget]:
        if self._local_reads:
            return self.store.applying(account_id, key_id)
        return await asyncio.to_thread(self.store.applying, account_id, key_id)

    async def reserve(
        self, account_id: str, key_id: str, wanted: Usage, minimum: Usage | None = None
    ) -> BudgetHold | None:
        """Holds `wanted` of the request's budgets, or what is left where that is less but
        at least `minimum` (default: `wanted`); else raises InsufficientQuotaError. None
        when no budget applies."""
        budgets = await self._applying(account_id, key_id)
        if not budgets:
            return None
        return await self.keeper.reserve(budgets, wanted, minimum or wanted, time.time())

    async def status(self, budget: Budget) -> BudgetStatus:
        now = time.time()
        spend = await self.keeper.spend(budget, now)
        return BudgetStatus(budget, spend, budget.starts(now), budget.ends(now))

    async def statuses(self, scope: Scope | None = None) -> list[BudgetStatus]:
        """Every budget's status, or those of one scope."""
        budgets = await asyncio.to_thread(self.store.all)
        return [await self.status(b) for b in budgets if scope is None or b.scope == scope]

    async def status_of(self, scope: Scope, owner: str) -> BudgetStatus | None:
        budget = await asyncio.to_thread(self.store.get, scope, owner)
        return None if budget is None else await self.status(budget)
