"""Budget periods, the budget store on both databases, prices in the registry."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mimoserve.billing.budgets import Budget, BudgetStore
from mimoserve.billing.prices import Price, cost_micros
from mimoserve.metering.ledger import UsageRecord
from mimoserve.registry import ModelRegistry, RegistryError
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def test_periods_follow_the_utc_calendar() -> None:
    day = Budget("key", "k", "tokens", 10, "day")
    month = Budget("key", "k", "tokens", 10, "month")
    never = Budget("key", "k", "tokens", 10, "none")
    now = at(2026, 12, 31, 23, 59, 59)
    assert day.starts(now) == at(2026, 12, 31) and day.ends(now) == at(2027, 1, 1)
    assert month.starts(now) == at(2026, 12, 1) and month.ends(now) == at(2027, 1, 1)
    assert month.ends(at(2027, 2, 10)) == at(2027, 3, 1)
    assert never.starts(now) == 0 and never.ends(now) is None
    assert day.counter(now) != day.counter(now + 1)  # a new day, a new count
    reset = Budget("key", "k", "tokens", 10, "month", reset_at=at(2026, 12, 15))
    assert reset.starts(now) == at(2026, 12, 15)  # a reset restarts the count...
    assert reset.starts(at(2027, 1, 2)) == at(2027, 1, 1)  # ...until the next period


def test_the_store_keeps_budgets_and_sums_the_records(any_database: Database) -> None:
    store, usage = BudgetStore(any_database), SqlUsageStore(any_database)
    key = store.set(Budget("key", "k1", "tokens", 1000, "day"))
    account = store.set(Budget("account", "a1", "money", 5_000_000, "month", soft_percent=50))
    assert store.applying("a1", "k1") == [account, key]
    assert store.applying("a2", "k2") == []
    usage.insert_usage([
        UsageRecord(key_id="k1", account_id="a1", model="m", status=200, prompt_tokens=10,
                    completion_tokens=5, cost_micros=700, created_at=100.0),
        UsageRecord(key_id="k2", account_id="a1", model="m", status=200, prompt_tokens=1,
                    completion_tokens=1, cost_micros=300, created_at=200.0),
    ])  # fmt: skip
    assert store.spent_since(key, 0) == 15
    assert store.spent_since(key, 150) == 0
    assert store.spent_since(account, 0) == 1000  # the account's every key
    changed = store.set(Budget("key", "k1", "money", 9, "none"))
    assert store.get("key", "k1") == changed
    reset = store.reset("key", "k1", now=123.0)
    assert reset is not None and reset.reset_at == 123.0
    assert store.set(Budget("key", "k1", "tokens", 5, "day")).reset_at == 123.0  # kept
    assert store.remove("key", "k1") and not store.remove("key", "k1")
    assert store.reset("key", "k1") is None
    assert store.all() == [account]


def test_cost_prices_cached_input_and_counts_reasoning_as_output() -> None:
    price = Price(input=0.4, cached_input=0.1, output=1.6)
    # completion tokens include reasoning tokens, so reasoning is priced as output.
    assert cost_micros(
        price, prompt_tokens=1000, cached_tokens=600, completion_tokens=500
    ) == round(400 * 0.4 + 600 * 0.1 + 500 * 1.6)
    assert cost_micros(Price(input=1, output=2), 10, 4, 1) == 12  # cached at the input price
    assert cost_micros(None, 10**6, 0, 10**6) == 0


def test_the_registry_reads_prices_and_one_currency() -> None:
    registry = ModelRegistry.from_toml(
        'currency = "CNY"\n[models.m]\nweights = "w"\nprice = {input = 1, output = 3}\n'
    )
    assert registry.currency == "CNY"
    entry = registry.get("m")
    assert entry is not None and entry.price == Price(input=1, output=3)
    assert registry.with_weights("x").currency == "CNY"
    assert ModelRegistry.from_toml('[models.m]\nweights = "w"\n').currency == "USD"
    for bad in ('currency = "dollars"\n[models.m]\nweights = "w"\n',
                '[models.m]\nweights = "w"\nprice = {input = -1, output = 3}\n',
                '[models.m]\nweights = "w"\nprice = {input = 1}\n',
                'budget = 3\n[models.m]\nweights = "w"\n'):  # fmt: skip
        with pytest.raises(RegistryError):
            ModelRegistry.from_toml(bad)
