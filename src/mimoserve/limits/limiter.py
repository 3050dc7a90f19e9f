"""Token-bucket rate limiting, in process.

Requests/min and tokens/min are buckets per (account, model), shared by all of the
account's keys; a key with limits of its own also has buckets per (key, model).
Concurrency is counted per key, in places: a request with n choices takes n (each is a
sequence the engine runs). A request reserves its estimated tokens at admission
and settles to what it really used at the end; using more than reserved leaves the
bucket in debt, so the rate over a minute still holds. Every operation runs on the
event loop without awaiting, so counts are exact however many requests race.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mimoserve.errors import MimoError
from mimoserve.limits.policy import Limits


class RateLimitedError(MimoError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, headers={"Retry-After": str(seconds)})


@dataclass(frozen=True)
class Charge:
    """One bucket a request draws from, whichever limiter keeps the buckets."""

    name: tuple[str, str, str, str]  # (scope, owner, model, "rpm" | "tpm")
    capacity: int
    cost: int
    describes: str  # for the 429's message

    @property
    def is_tokens(self) -> bool:
        return self.name[3] == "tpm"


def charges(
    *, account_id: str, key_id: str, model: str, account_limits: Limits, key_limits: Limits,
    tokens: int,
) -> list[Charge]:  # fmt: skip
    """The buckets a request draws from: requests and tokens per minute for its account
    and model, and for its key when the key has limits of its own."""
    found = []
    for scope, owner, limits in (("account", account_id, account_limits),
                                 ("key", key_id, key_limits)):  # fmt: skip
        if limits.rpm is not None:
            found.append(Charge((scope, owner, model, "rpm"), limits.rpm, 1,
                                f"requests per minute for {model} ({limits.rpm})"))  # fmt: skip
        if limits.tpm is not None:
            # A request larger than the whole budget is let through alone, into debt.
            found.append(Charge((scope, owner, model, "tpm"), limits.tpm, min(tokens, limits.tpm),
                                f"tokens per minute for {model} ({limits.tpm})"))  # fmt: skip
    return found


def too_many_in_flight(limit: int, places: int = 1) -> RateLimitedError:
    if places > limit:
        return RateLimitedError(
            f"This request's {places} choices need {places} concurrent places; this key may"
            f" hold {limit}. Ask for fewer choices (n).",
            retry_after_s=1,
        )
    return RateLimitedError(
        f"Too many concurrent requests for this key (limit {limit}).", retry_after_s=1
    )


def short_of(charge: Charge, wait_s: float) -> RateLimitedError:
    return RateLimitedError(
        f"Rate limit reached: {charge.describes}. Retry after the indicated time.",
        retry_after_s=wait_s,
    )


class Admission(Protocol):
    """An admitted request's hold on its limits."""

    reserved: int

    def settle(self, used_tokens: int) -> None:
        """Charges what was really used instead of the reservation; releases the slot."""


class Limiter(Protocol):
    """Rate limits in this process (`RateLimiter`) or shared by replicas (`RedisRateLimiter`)."""

    async def acquire(
        self, *, account_id: str, key_id: str, model: str, account_limits: Limits,
        key_limits: Limits, tokens: int, places: int = 1,
    ) -> Admission:  # fmt: skip
        """Admits the request, holding `places` of the key's concurrency (one per choice),
        or raises RateLimitedError (or StoreError)."""

    async def in_flight(self, key_id: str) -> int: ...

    async def ping(self) -> None:
        """Raises StoreError when the counters cannot be reached (for /ready)."""

    async def drain(self) -> None:
        """Waits for settlements still on their way (a no-op in process)."""

    async def close(self) -> None: ...


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        return (cost - self.level) / (self.capacity / 60.0)


@dataclass
class Ticket:
    """One admitted request: settle its tokens, then release its concurrency slot."""

    _limiter: RateLimiter
    _key_id: str
    _token_charges: list[tuple[_Bucket, float]]  # token buckets and what each was charged
    reserved: int
    _places: int = 1
    _open: bool = field(default=True)

    def settle(self, used_tokens: int) -> None:
        """Charges what was really used instead of the reservation; releases the slot."""
        if not self._open:
            return
        self._open = False
        now = self._limiter.clock()
        for bucket, charged in self._token_charges:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level + charged - used_tokens)
        self._limiter._release(self._key_id, self._places)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    def _bucket(self, name: tuple[str, ...], capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None or bucket.capacity != capacity:  # new, or the limit was changed
            bucket = _Bucket(float(capacity), float(capacity), now)
            self._buckets[name] = bucket
        bucket.refill(now)
        return bucket

    async def acquire(
        self, *, account_id: str, key_id: str, model: str, account_limits: Limits,
        key_limits: Limits, tokens: int, places: int = 1,
    ) -> Ticket:  # fmt: skip
        return self.admit(
            account_id=account_id, key_id=key_id, model=model,
            account_limits=account_limits, key_limits=key_limits, tokens=tokens, places=places,
        )  # fmt: skip

    async def drain(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def admit(
        self,
        *,
        account_id: str,
        key_id: str,
        model: str,
        account_limits: Limits,
        key_limits: Limits,
        tokens: int,
        places: int = 1,
    ) -> Ticket:
        now = self.clock()
        effective = account_limits.overridden_by(key_limits)
        if effective.max_concurrent is not None and (
            self._in_flight.get(key_id, 0) + places > effective.max_concurrent
        ):
            raise too_many_in_flight(effective.max_concurrent, places)
        checks = [
            (self._bucket(charge.name, charge.capacity, now), charge)
            for charge in charges(account_id=account_id, key_id=key_id, model=model,
                                  account_limits=account_limits, key_limits=key_limits,
                                  tokens=tokens)
        ]  # fmt: skip
        for bucket, charge in checks:
            if bucket.level < charge.cost:
                raise short_of(charge, bucket.wait_for(charge.cost))
        for bucket, charge in checks:
            bucket.level -= charge.cost
        token_charges = [(bucket, float(c.cost)) for bucket, c in checks if c.is_tokens]
        self._in_flight[key_id] = self._in_flight.get(key_id, 0) + places
        return Ticket(self, key_id, token_charges, tokens, places)

    def _release(self, key_id: str, places: int = 1) -> None:
        remaining = self._in_flight.get(key_id, 0) - places
        if remaining > 0:
            self._in_flight[key_id] = remaining
        else:
            self._in_flight.pop(key_id, None)

    async def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)
