"""Reserve-then-settle against budgets, counted in this process.

A request reserves what it may spend (its prompt estimate and its whole possible
output, every choice, or that priced) once what requests in flight reserved is counted.
Where less than that is left, it gets what is left, provided that is at least its
`minimum` (else 402): the core then caps its output to what it got, so it can never
spend beyond its reservation by more than its prompt's estimate was short. It settles
to its real use when it ends. The count of a period starts from the usage records (the
durable truth) the first time it is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mimoserve.billing.budgets import Budget, Spend
from mimoserve.errors import MimoError

# (budget, since) -> spent since then, from the usage records. May block: run in a thread.
SpentSince = Callable[[Budget, float], int]


class InsufficientQuotaError(MimoError):
    status_code = 402
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


def spent_error(budget: Budget) -> InsufficientQuotaError:
    owner = "account" if budget.scope == "account" else "API key"
    period = {"day": " for today (UTC)", "month": " for this month (UTC)", "none": ""}[
        budget.period
    ]
    what = "token budget" if budget.unit == "tokens" else "spending budget"
    return InsufficientQuotaError(
        f"Insufficient balance: this {owner}'s {what}{period} is spent. "
        "Ask the server's administrator to raise or reset it."
    )


@dataclass(frozen=True)
class Usage:
    """An amount in both units a budget may count: tokens and money (micros)."""

    tokens: int
    cost_micros: int

    def counted_by(self, budget: Budget) -> int:
        return budget.charge(self.tokens, self.cost_micros)


@dataclass(frozen=True)
class Charge:
    """One budget a request draws from, and how much it reserved there."""

    budget: Budget
    counter: str
    reserved: int


class BudgetHold(Protocol):
    charges: Sequence[Charge]

    def settle(self, tokens: int, cost_micros: int) -> None:
        """Counts the real use instead of the reservation (once; later calls do nothing)."""


class BudgetKeeper(Protocol):
    async def reserve(
        self, budgets: Sequence[Budget], wanted: Usage, minimum: Usage, now: float
    ) -> BudgetHold:
        """Reserves `wanted` against every budget, or what is left where that is less but
        at least `minimum`; else raises InsufficientQuotaError (nothing held)."""

    async def spend(self, budget: Budget, now: float) -> Spend: ...

    async def drain(self) -> None:
        """Waits for settlements still on their way."""

    async def close(self) -> None: ...


@dataclass
class _Count:
    spent: int
    reserved: int = 0


@dataclass
class LocalHold:
    _keeper: LocalBudgetKeeper
    charges: Sequence[Charge]
    _open: bool = field(default=True)

    def settle(self, tokens: int, cost_micros: int) -> None:
        if self._open:
            self._open = False
            for charge in self.charges:
                count = self._keeper.counts.get(charge.counter)
                if count is None:  # a past period, dropped: its records hold the use
                    continue
                count.reserved -= charge.reserved
                count.spent += charge.budget.charge(tokens, cost_micros)
            self._keeper.changed(self.charges)


class LocalBudgetKeeper:
    """Counts in a dict; every check and charge runs on the event loop without awaiting,
    so concurrent requests cannot both take the last of a budget."""

    def __init__(
        self, spent_since: SpentSince, on_change: Callable[[Budget, Spend], None] | None = None
    ) -> None:
        self._spent_since = spent_since
        self._on_change = on_change
        self.counts: dict[str, _Count] = {}

    async def _count(self, budget: Budget, now: float) -> _Count:
        name = budget.counter(now)
        if name not in self.counts:
            spent = await asyncio.to_thread(self._spent_since, budget, budget.starts(now))
            if name not in self.counts:  # another request may have started it meanwhile
                self._forget_past(name)
                self.counts[name] = _Count(spent)
        return self.counts[name]

    def _forget_past(self, name: str) -> None:
        """Drops the owner's counts of earlier periods once nothing in flight uses them."""
        owner = name.rsplit(":", 1)[0] + ":"
        for other in [n for n, c in self.counts.items() if n.startswith(owner) and not c.reserved]:
            del self.counts[other]

    async def reserve(
        self, budgets: Sequence[Budget], wanted: Usage, minimum: Usage, now: float
    ) -> LocalHold:
        counts = [await self._count(budget, now) for budget in budgets]
        # From here to the end nothing awaits: the checks and the charges are one step.
        charges = []
        for budget, count in zip(budgets, counts, strict=True):
            left = budget.amount - count.spent - count.reserved
            if left <= 0 or left < minimum.counted_by(budget):
                raise spent_error(budget)
            granted = min(wanted.counted_by(budget), left)
            charges.append(Charge(budget, budget.counter(now), granted))
        for charge, count in zip(charges, counts, strict=True):
            count.reserved += charge.reserved
        self.changed(charges)
        return LocalHold(self, charges)

    def changed(self, charges: Sequence[Charge]) -> None:
        if self._on_change is not None:
            for charge in charges:
                if (count := self.counts.get(charge.counter)) is not None:
                    self._on_change(charge.budget, Spend(count.spent, count.reserved))

    async def spend(self, budget: Budget, now: float) -> Spend:
        count = await self._count(budget, now)
        return Spend(count.spent, count.reserved)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass
