"""What an administrator can do, once: the CLI (`mimoserve keys|budgets ...`) and the
admin API (`/admin`) are thin callers of this, so both check the same things.

Blocking (the stores are synchronous): the API runs these in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from mimoserve.auth.keys import NO_LIMITS, IssuedKey, KeyStore
from mimoserve.billing.budgets import MAX_BUDGET, Budget, BudgetStore, Period, Scope, Unit
from mimoserve.billing.prices import to_micros
from mimoserve.errors import InvalidRequestError, NotFoundError
from mimoserve.limits.policy import Limits


@dataclass(frozen=True)
class NewKey:
    name: str
    account_id: str
    expires_in_days: float | None = None
    allowed_models: Collection[str] | None = None
    limits: Limits = NO_LIMITS


def budget_amount(unit: Unit, amount: float) -> int:
    """A budget's amount as stored: whole tokens, or micros of the currency."""
    if unit == "tokens" and not float(amount).is_integer():
        raise InvalidRequestError("A token budget is a whole number of tokens.", param="amount")
    stored = int(amount) if unit == "tokens" else to_micros(amount)
    if stored < 1:
        raise InvalidRequestError("The amount is below one micro of the currency.", param="amount")
    if stored > MAX_BUDGET:
        raise InvalidRequestError(f"The amount is above {MAX_BUDGET} units.", param="amount")
    return stored


class Administration:
    def __init__(self, keys: KeyStore, budgets: BudgetStore, served_models: Collection[str]):
        self.keys = keys
        self.budgets = budgets
        self._served = frozenset(served_models)

    def existing_account(self, account_id: str) -> None:
        if self.keys.account(account_id) is None:
            raise NotFoundError(f"No account with id {account_id!r}.", param="account_id")

    def existing_owner(self, scope: Scope, owner: str) -> None:
        if scope == "account":
            self.existing_account(owner)
        elif self.keys.key(owner) is None:
            raise NotFoundError(f"No key with id {owner!r}.", param="owner")

    def create_key(self, new: NewKey) -> IssuedKey:
        """A key of an existing account, allowed only models this server serves."""
        self.existing_account(new.account_id)
        unknown = sorted(set(new.allowed_models or ()) - self._served)
        if unknown:
            raise InvalidRequestError(
                f"Unknown models: {', '.join(unknown)}.", param="allowed_models"
            )
        days = new.expires_in_days
        return self.keys.create(
            new.name,
            account_id=new.account_id,
            expires_at=time.time() + days * 86400 if days else None,
            allowed_models=frozenset(new.allowed_models) if new.allowed_models else None,
            limits=new.limits,
        )

    def set_budget(
        self, scope: Scope, owner: str, unit: Unit, amount: float, period: Period,
        soft_percent: int = 80,
    ) -> Budget:  # fmt: skip
        """Creates or changes a budget; what was spent in its period still counts."""
        stored = budget_amount(unit, amount)
        self.existing_owner(scope, owner)
        return self.budgets.set(Budget(scope, owner, unit, stored, period, soft_percent))
