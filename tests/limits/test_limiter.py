from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from mimoserve.limits.limiter import Admission, Limiter, RateLimitedError, RateLimiter
from mimoserve.limits.policy import Limits
from mimoserve.limits.redis_limiter import RedisRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


NONE = Limits()
Make = Callable[[Clock], Limiter]


@pytest.fixture(params=["in-process", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    """The same behaviour is required of both limiters; each test gets fresh counters."""
    if request.param == "in-process":
        return RateLimiter
    url = request.getfixturevalue("redis_url")
    prefix = f"t{uuid.uuid4().hex}"
    return lambda clock: RedisRateLimiter(url, prefix=prefix, clock=clock)


async def admit(limiter: Limiter, account: Limits = NONE, key: Limits = NONE, tokens: int = 10,
                key_id: str = "k1", account_id: str = "a1", model: str = "m") -> Admission:  # fmt: skip
    return await limiter.acquire(account_id=account_id, key_id=key_id, model=model,
                                 account_limits=account, key_limits=key, tokens=tokens)  # fmt: skip


async def settle(limiter: Limiter, ticket: Admission, used: int) -> None:
    ticket.settle(used)
    await limiter.drain()


async def test_requests_per_minute_refill_over_the_minute(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    for _ in range(3):
        await settle(limiter, await admit(limiter, Limits(rpm=3)), 10)
    with pytest.raises(RateLimitedError) as refused:
        await admit(limiter, Limits(rpm=3))
    assert refused.value.status_code == 429
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.headers["Retry-After"]) == 20  # one request refills in 60/3 s
    clock.now += 20
    await settle(limiter, await admit(limiter, Limits(rpm=3)), 10)


async def test_limits_are_per_account_and_model_summed_over_keys(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    await admit(limiter, Limits(rpm=2), key_id="k1")
    await admit(limiter, Limits(rpm=2), key_id="k2")
    with pytest.raises(RateLimitedError):
        await admit(limiter, Limits(rpm=2), key_id="k3")
    await admit(limiter, Limits(rpm=2), key_id="k3", model="other")  # another model: its own budget
    await admit(limiter, Limits(rpm=2), key_id="k4", account_id="a2")  # another account too


async def test_tokens_are_reserved_then_settled_to_real_use(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    ticket = await admit(limiter, Limits(tpm=1000), tokens=900)
    with pytest.raises(RateLimitedError):
        await admit(limiter, Limits(tpm=1000), tokens=200)  # 100 left while 900 are reserved
    await settle(limiter, ticket, 150)  # the request really used 150
    await admit(limiter, Limits(tpm=1000), tokens=800)  # 850 available again
    await settle(limiter, ticket, 10_000)  # settling twice changes nothing
    with pytest.raises(RateLimitedError):
        await admit(limiter, Limits(tpm=1000), tokens=100)


async def test_using_more_than_reserved_leaves_debt(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    await settle(
        limiter, await admit(limiter, Limits(tpm=600), tokens=100), 1200
    )  # 600 over budget
    with pytest.raises(RateLimitedError) as refused:
        await admit(limiter, Limits(tpm=600), tokens=1)
    assert int(refused.value.headers["Retry-After"]) >= 60
    clock.now += 61
    await admit(limiter, Limits(tpm=600), tokens=1)


async def test_concurrency_per_key_and_release_on_settle(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    first = await admit(limiter, key=Limits(max_concurrent=2))
    await admit(limiter, key=Limits(max_concurrent=2))
    with pytest.raises(RateLimitedError):
        await admit(limiter, key=Limits(max_concurrent=2))
    await admit(limiter, key=Limits(max_concurrent=2), key_id="other")
    await settle(limiter, first, 0)
    await admit(limiter, key=Limits(max_concurrent=2))
    assert await limiter.in_flight("k1") == 2


async def test_key_limits_apply_on_top_of_the_account(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    await admit(limiter, Limits(rpm=100), Limits(rpm=1), key_id="tight")
    with pytest.raises(RateLimitedError):
        await admit(limiter, Limits(rpm=100), Limits(rpm=1), key_id="tight")
    await admit(limiter, Limits(rpm=100), key_id="loose")


async def test_refused_request_consumes_nothing(make: Make) -> None:
    clock = Clock()
    limiter = make(clock)
    await admit(limiter, Limits(rpm=10, tpm=100), tokens=90)
    with pytest.raises(RateLimitedError):
        await admit(limiter, Limits(rpm=10, tpm=100), tokens=50)  # refused on tokens
    await admit(limiter, Limits(rpm=10, tpm=100), tokens=10)  # its request slot was not taken
    assert await limiter.in_flight("k1") == 2


async def test_replicas_sharing_redis_admit_exactly_the_limit(redis_url: str) -> None:
    import asyncio

    prefix = f"t{uuid.uuid4().hex}"
    replicas = [RedisRateLimiter(redis_url, prefix=prefix) for _ in range(3)]

    async def one(i: int) -> bool:
        try:
            await admit(replicas[i % 3], Limits(rpm=20, tpm=10_000), tokens=100, key_id=f"k{i}")
            return True
        except RateLimitedError:
            return False

    admitted = await asyncio.gather(*(one(i) for i in range(90)))
    assert sum(admitted) == 20  # the minute's budget exactly, however the replicas raced
    for replica in replicas:
        await replica.close()


async def test_a_dead_replicas_slots_come_back_after_the_lease(redis_url: str) -> None:
    clock = Clock()
    prefix = f"t{uuid.uuid4().hex}"
    dead = RedisRateLimiter(redis_url, prefix=prefix, clock=clock, lease_s=30)
    await admit(dead, key=Limits(max_concurrent=1))  # never settled: its process "died"
    alive = RedisRateLimiter(redis_url, prefix=prefix, clock=clock, lease_s=30)
    with pytest.raises(RateLimitedError):
        await admit(alive, key=Limits(max_concurrent=1))
    clock.now += 31
    await admit(alive, key=Limits(max_concurrent=1))
    await dead.close()
    await alive.close()


async def test_unreachable_redis_is_a_store_error_not_a_crash() -> None:
    from mimoserve.store.base import StoreError
    from tests.services import free_port

    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        await admit(limiter, Limits(rpm=5))
    await limiter.close()
