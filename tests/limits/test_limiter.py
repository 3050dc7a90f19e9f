from __future__ import annotations

import pytest

from mimoserve.limits.limiter import RateLimitedError, RateLimiter, Ticket
from mimoserve.limits.policy import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


NONE = Limits()


def admit(limiter: RateLimiter, account: Limits = NONE, key: Limits = NONE, tokens: int = 10,
          key_id: str = "k1", account_id: str = "a1", model: str = "m") -> Ticket:  # fmt: skip
    return limiter.admit(account_id=account_id, key_id=key_id, model=model,
                         account_limits=account, key_limits=key, tokens=tokens)  # fmt: skip


def test_requests_per_minute_refill_over_the_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    for _ in range(3):
        admit(limiter, Limits(rpm=3)).settle(10)
    with pytest.raises(RateLimitedError) as refused:
        admit(limiter, Limits(rpm=3))
    assert refused.value.status_code == 429
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.headers["Retry-After"]) == 20  # one request refills in 60/3 s
    clock.now += 20
    admit(limiter, Limits(rpm=3)).settle(10)


def test_limits_are_per_account_and_model_summed_over_keys() -> None:
    limiter = RateLimiter(Clock())
    admit(limiter, Limits(rpm=2), key_id="k1")
    admit(limiter, Limits(rpm=2), key_id="k2")
    with pytest.raises(RateLimitedError):
        admit(limiter, Limits(rpm=2), key_id="k3")
    admit(limiter, Limits(rpm=2), key_id="k3", model="other")  # another model: its own budget
    admit(limiter, Limits(rpm=2), key_id="k4", account_id="a2")  # another account too


def test_tokens_are_reserved_then_settled_to_real_use() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    ticket = admit(limiter, Limits(tpm=1000), tokens=900)
    with pytest.raises(RateLimitedError):
        admit(limiter, Limits(tpm=1000), tokens=200)  # 100 left while 900 are reserved
    ticket.settle(150)  # the request really used 150
    admit(limiter, Limits(tpm=1000), tokens=800)  # 850 available again
    ticket.settle(10_000)  # settling twice changes nothing
    with pytest.raises(RateLimitedError):
        admit(limiter, Limits(tpm=1000), tokens=100)


def test_using_more_than_reserved_leaves_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    admit(limiter, Limits(tpm=600), tokens=100).settle(1200)  # 600 over budget
    with pytest.raises(RateLimitedError) as refused:
        admit(limiter, Limits(tpm=600), tokens=1)
    assert int(refused.value.headers["Retry-After"]) >= 60
    clock.now += 61
    admit(limiter, Limits(tpm=600), tokens=1)


def test_concurrency_per_key_and_release_on_settle() -> None:
    limiter = RateLimiter(Clock())
    first = admit(limiter, key=Limits(max_concurrent=2))
    admit(limiter, key=Limits(max_concurrent=2))
    with pytest.raises(RateLimitedError):
        admit(limiter, key=Limits(max_concurrent=2))
    admit(limiter, key=Limits(max_concurrent=2), key_id="other")
    first.settle(0)
    admit(limiter, key=Limits(max_concurrent=2))
    assert limiter.in_flight("k1") == 2


def test_key_limits_apply_on_top_of_the_account() -> None:
    limiter = RateLimiter(Clock())
    admit(limiter, Limits(rpm=100), Limits(rpm=1), key_id="tight")
    with pytest.raises(RateLimitedError):
        admit(limiter, Limits(rpm=100), Limits(rpm=1), key_id="tight")
    admit(limiter, Limits(rpm=100), key_id="loose")


def test_refused_request_consumes_nothing() -> None:
    limiter = RateLimiter(Clock())
    admit(limiter, Limits(rpm=10, tpm=100), tokens=90)
    with pytest.raises(RateLimitedError):
        admit(limiter, Limits(rpm=10, tpm=100), tokens=50)  # refused on tokens
    admit(limiter, Limits(rpm=10, tpm=100), tokens=10)  # its request slot was not taken
    assert limiter.in_flight("k1") == 2
