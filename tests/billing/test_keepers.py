"""Reserve-then-settle against budgets: the same behaviour from both keepers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from mimoserve.billing.budgets import Budget, Spend
from mimoserve.billing.keeper import (
    BudgetKeeper,
    InsufficientQuotaError,
    LocalBudgetKeeper,
    Usage,
)
from mimoserve.billing.redis_keeper import RedisBudgetKeeper
from tests.waiting import until


class Records:
    """The usage records' sums, as `BudgetStore.spent_since` would read them."""

    def __init__(self) -> None:
        self.spent: dict[tuple[str, float], int] = {}
        self.asked: list[tuple[str, float]] = []

    def __call__(self, budget: Budget, since: float) -> int:
        self.asked.append((budget.owner, since))
        return self.spent.get((budget.owner, since), 0)


Make = Callable[[Records], BudgetKeeper]
NOON = datetime(2026, 12, 2, 12, tzinfo=UTC).timestamp()
ANY_LEFT = Usage(0, 0)  # take what is left, however little


@pytest.fixture(params=["in-process", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    if request.param == "in-process":
        return lambda records: LocalBudgetKeeper(records)
    url = request.getfixturevalue("redis_url")
    prefix = f"t{uuid.uuid4().hex}"  # fresh counts per test
    return lambda records: RedisBudgetKeeper(url, records, prefix=prefix)


def tokens(amount: int, period: str = "day", owner: str = "acct") -> Budget:
    return Budget("account", owner, "tokens", amount, period)  # type: ignore[arg-type]


async def test_a_request_settles_to_what_it_really_used(make: Make) -> None:
    keeper = make(Records())
    budget = tokens(1000)
    hold = await keeper.reserve([budget], Usage(600, 0), ANY_LEFT, NOON)
    assert [c.reserved for c in hold.charges] == [600]
    assert await keeper.spend(budget, NOON) == Spend(spent=0, reserved=600)
    hold.settle(90, 0)  # shorter than reserved: the rest comes back
    hold.settle(500, 0)  # a second settle of the same hold counts nothing
    await keeper.drain()
    assert await keeper.spend(budget, NOON) == Spend(spent=90, reserved=0)
    await keeper.close()


async def test_a_spent_budget_refuses_with_402_until_its_period_ends(make: Make) -> None:
    keeper = make(Records())
    budget = tokens(100)
    hold = await keeper.reserve([budget], Usage(500, 0), ANY_LEFT, NOON)  # capped at what is left
    assert hold.charges[0].reserved == 100
    hold.settle(130, 0)  # used more than was left: the overshoot is this request's own
    await keeper.drain()
    with pytest.raises(InsufficientQuotaError) as refused:
        await keeper.reserve([budget], Usage(1, 0), ANY_LEFT, NOON + 3600)
    assert refused.value.status_code == 402
    assert refused.value.code == "insufficient_quota"
    assert "today (UTC)" in refused.value.message
    # The next UTC day is a new period: a fresh count.
    tomorrow = NOON + 86400
    hold = await keeper.reserve([budget], Usage(50, 0), ANY_LEFT, tomorrow)
    assert await keeper.spend(budget, tomorrow) == Spend(spent=0, reserved=50)
    hold.settle(50, 0)
    await keeper.drain()
    await keeper.close()


async def test_a_count_starts_from_the_usage_records(make: Make) -> None:
    records = Records()
    budget = tokens(1000, "month")
    month_start = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    records.spent[("acct", month_start)] = 950  # spent before this process started
    keeper = make(records)
    hold = await keeper.reserve([budget], Usage(200, 0), ANY_LEFT, NOON)
    assert hold.charges[0].reserved == 50
    assert records.asked == [("acct", month_start)]
    hold.settle(10, 0)
    await keeper.drain()
    await keeper.reserve([budget], Usage(1, 0), ANY_LEFT, NOON)
    assert records.asked == [("acct", month_start)], "counted from the records only once"
    await keeper.close()


async def test_every_budget_must_have_room_and_a_refusal_holds_nothing(make: Make) -> None:
    keeper = make(Records())
    account = tokens(1000)
    key = Budget("key", "k1", "money", 5, "none")  # 5 micros
    hold = await keeper.reserve([account, key], Usage(100, 5), ANY_LEFT, NOON)
    hold.settle(100, 5)
    await keeper.drain()
    with pytest.raises(InsufficientQuotaError) as refused:
        await keeper.reserve([account, key], Usage(100, 3), ANY_LEFT, NOON)
    assert "API key's spending budget is spent" in refused.value.message
    assert await keeper.spend(account, NOON) == Spend(spent=100, reserved=0)
    await keeper.close()


async def test_concurrent_requests_cannot_overspend(make: Make) -> None:
    """Many requests race for one budget; each really uses what it reserved or less, so
    the period's spend never passes the budget, and it is spent to the last token."""
    keeper = make(Records())
    budget = tokens(1000)

    async def one(i: int) -> int:
        try:
            hold = await keeper.reserve([budget], Usage(30 + i % 7, 0), ANY_LEFT, NOON)
        except InsufficientQuotaError:
            return 0
        await asyncio.sleep(0.001 * (i % 3))
        used = hold.charges[0].reserved  # at most what it reserved
        hold.settle(used, 0)
        return used

    used = 0
    while True:
        wave = await asyncio.gather(*(one(i) for i in range(40)))
        used += sum(wave)
        await keeper.drain()
        if not any(wave):
            break
    assert used == 1000
    assert await keeper.spend(budget, NOON) == Spend(spent=1000, reserved=0)
    await keeper.close()


async def test_two_redis_keepers_share_one_budget(redis_url: str) -> None:
    """Two replicas, each with its own keeper: one count."""
    prefix = f"t{uuid.uuid4().hex}"
    records = Records()
    a, b = (RedisBudgetKeeper(redis_url, records, prefix=prefix) for _ in range(2))
    budget = tokens(300)
    holds = await asyncio.gather(*(k.reserve([budget], Usage(100, 0), ANY_LEFT, NOON) for k in (a, b, a, b)),
                                 return_exceptions=True)  # fmt: skip
    refused = [h for h in holds if isinstance(h, InsufficientQuotaError)]
    admitted = [h for h in holds if not isinstance(h, BaseException)]
    assert len(admitted) == 3 and len(refused) == 1
    for hold in admitted:
        hold.settle(100, 0)
    await a.drain()
    await b.drain()
    assert await b.spend(budget, NOON) == Spend(spent=300, reserved=0)
    await a.close()
    await b.close()


async def test_a_dead_replicas_reservation_ends_with_its_lease(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex}"
    dead = RedisBudgetKeeper(redis_url, Records(), prefix=prefix, lease_s=0.3)
    alive = RedisBudgetKeeper(redis_url, Records(), prefix=prefix)
    budget = tokens(100)
    await dead.reserve([budget], Usage(100, 0), ANY_LEFT, NOON)  # never settled
    await dead.close()  # the replica dies: nobody renews its lease any more
    with pytest.raises(InsufficientQuotaError):
        await alive.reserve([budget], Usage(10, 0), ANY_LEFT, NOON)

    async def reserves() -> bool:
        try:
            hold = await alive.reserve([budget], Usage(10, 0), ANY_LEFT, NOON)
        except InsufficientQuotaError:
            return False
        assert hold.charges[0].reserved == 10
        return True

    while not await reserves():  # the lease ends on Redis's clock
        await asyncio.sleep(0.02)
    await alive.close()


async def test_a_running_requests_hold_outlives_its_lease(redis_url: str) -> None:
    # A request may run far longer than any fixed lease (minutes reading a long prompt
    # on a CPU); while its replica lives, its hold is renewed and never lapses.
    prefix = f"t{uuid.uuid4().hex}"
    running = RedisBudgetKeeper(redis_url, Records(), prefix=prefix, lease_s=0.3)
    other = RedisBudgetKeeper(redis_url, Records(), prefix=prefix)
    budget = tokens(100)
    hold = await running.reserve([budget], Usage(100, 0), ANY_LEFT, NOON)
    await until(lambda: running.leases.rounds >= 4, "the lease was renewed several times")
    with pytest.raises(InsufficientQuotaError):  # still held, four lease-thirds later
        await other.reserve([budget], Usage(10, 0), ANY_LEFT, NOON)
    hold.settle(40, 0)
    await running.drain()
    assert await other.spend(budget, NOON) == Spend(40, 0)
    await running.close()
    await other.close()


async def test_a_settlement_that_meets_a_redis_hiccup_is_retried_once(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex}"
    keeper = RedisBudgetKeeper(redis_url, Records(), prefix=prefix)
    budget = tokens(1000)
    hold = await keeper.reserve([budget], Usage(300, 0), ANY_LEFT, NOON)
    script = keeper._settle
    calls = 0

    async def flaky(**kwargs: Any) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("connection reset")
        if calls == 2:  # it ran, but its answer was lost: the retry must not count twice
            await script(**kwargs)
            raise RedisConnectionError("connection reset after the script ran")
        return await script(**kwargs)

    keeper._settle = flaky  # type: ignore[assignment]
    hold.settle(250, 0)
    await keeper.drain()
    assert calls == 3
    assert await keeper.spend(budget, NOON) == Spend(250, 0)  # counted once, not dropped
    await keeper.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    amount=st.integers(1, 500),
    steps=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 250)), max_size=30),
)
def test_spend_passes_the_budget_only_by_what_requests_used_beyond_their_reservations(
    amount: int, steps: list[tuple[int, int]]
) -> None:
    async def run() -> None:
        keeper = LocalBudgetKeeper(Records())
        budget = tokens(amount)
        overshoot = 0
        holds = []
        for wanted, used in steps:
            try:
                hold = await keeper.reserve([budget], Usage(wanted, 0), ANY_LEFT, NOON)
            except InsufficientQuotaError:
                spend = await keeper.spend(budget, NOON)
                assert spend.spent + spend.reserved >= amount
                continue
            holds.append((hold, used))
            if len(holds) > 2:  # a few stay in flight
                done, real = holds.pop(0)
                overshoot += max(0, real - done.charges[0].reserved)
                done.settle(real, 0)
            spend = await keeper.spend(budget, NOON)
            assert spend.spent + spend.reserved <= amount + overshoot
        for hold, real in holds:
            overshoot += max(0, real - hold.charges[0].reserved)
            hold.settle(real, 0)
        spend = await keeper.spend(budget, NOON)
        assert spend.reserved == 0
        assert spend.spent <= amount + overshoot

    asyncio.run(run())


async def test_past_periods_are_forgotten_once_settled() -> None:
    keeper = LocalBudgetKeeper(Records())
    budget = tokens(100)
    late = await keeper.reserve(
        [budget], Usage(10, 0), ANY_LEFT, NOON
    )  # still in flight at midnight
    for day in range(1, 4):
        hold = await keeper.reserve([budget], Usage(10, 0), ANY_LEFT, NOON + day * 86400)
        hold.settle(10, 0)
    assert len(keeper.counts) == 2  # today's, and the one a request still holds
    late.settle(10, 0)  # its period's count is still there to settle into
    await keeper.reserve([budget], Usage(1, 0), ANY_LEFT, NOON + 4 * 86400)
    assert len(keeper.counts) == 1


async def test_a_request_whose_minimum_does_not_fit_is_refused_and_holds_nothing(
    make: Make,
) -> None:
    keeper = make(Records())
    budget = tokens(1000)
    first = await keeper.reserve([budget], Usage(700, 0), Usage(700, 0), NOON)
    with pytest.raises(InsufficientQuotaError):  # 300 left, 400 needed at least
        await keeper.reserve([budget], Usage(900, 0), Usage(400, 0), NOON)
    partial = await keeper.reserve([budget], Usage(900, 0), Usage(200, 0), NOON)
    assert [c.reserved for c in partial.charges] == [300]  # what is left, not more
    first.settle(700, 0)
    partial.settle(300, 0)
    await keeper.drain()
    assert await keeper.spend(budget, NOON) == Spend(1000, 0)
    await keeper.close()
