"""Rate limits shared by every replica, kept in Redis and updated by Lua scripts.

The same token buckets as the in-process limiter (requests/min and tokens/min per
account and model, and per key when the key has limits of its own), but each check
and charge is one script run, which Redis executes atomically: two replicas admitting
at once cannot both take the last request of a minute. Time comes from Redis (`TIME`),
so replicas with skewed clocks still agree. Concurrency per key is a sorted set of
tickets with a lease, so the slots of a replica that dies come back when the lease ends.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from mimoserve.limits.limiter import charges, short_of, too_many_in_flight
from mimoserve.limits.policy import Limits
from mimoserve.store.base import StoreError
from mimoserve.store.redis_scripts import LUA_NOW, LeaseRenewer, Settlements

log = logging.getLogger(__name__)

# A bucket is a hash {level, ts, cap}. A missing bucket, or one whose limit changed, is full.
_REFILL = (
    LUA_NOW
    + """
local function level_of(key, cap, now)
  local h = redis.call('HMGET', key, 'level', 'ts', 'cap')
  local level, ts = tonumber(h[1]), tonumber(h[2])
  if level == nil or tonumber(h[3]) ~= cap then return cap end
  return math.min(cap, level + (now - ts) * cap / 60)
end
local function store(key, cap, level, now)
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now), 'cap', tostring(cap))
  -- Kept until full again (a full bucket and a missing one are the same).
  redis.call('EXPIRE', key, math.ceil((cap - level) * 60 / cap) + 1)
end
"""
)

# KEYS: n buckets, then the key's concurrency set.
# ARGV: now (-1: Redis time), n, max_concurrent (-1: none), ticket, lease_s, places,
#       then capacity and cost per bucket. A request of several places (choices) holds
#       members ticket, ticket#2, ... ticket#places.
# Returns {1} when admitted; {0, -1} when the key is at its concurrency limit;
# {0, i, wait_s} when bucket i lacks the cost.
_ADMIT = (
    _REFILL
    + """
local now = now_s(tonumber(ARGV[1]))
local n, max_cc = tonumber(ARGV[2]), tonumber(ARGV[3])
local slots = KEYS[n + 1]
local places = tonumber(ARGV[6])
if max_cc >= 0 then
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZCARD', slots) + places > max_cc then return {0, -1} end
end
local levels = {}
for i = 1, n do
  local cap, cost = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  levels[i] = level_of(KEYS[i], cap, now)
  if levels[i] < cost then return {0, i, tostring((cost - levels[i]) * 60 / cap)} end
end
for i = 1, n do
  local cap, cost = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  store(KEYS[i], cap, levels[i] - cost, now)
end
local lease = tonumber(ARGV[5])
redis.call('ZADD', slots, now + lease, ARGV[4])
for p = 2, places do redis.call('ZADD', slots, now + lease, ARGV[4] .. '#' .. p) end
redis.call('EXPIRE', slots, math.ceil(lease) + 1)
return {1}
"""
)

# KEYS: n token buckets, then the concurrency set. ARGV: now, n, ticket, used, places,
# then cap, charged per bucket.
_SETTLE = (
    _REFILL
    + """
local now = now_s(tonumber(ARGV[1]))
local n, used = tonumber(ARGV[2]), tonumber(ARGV[4])
for i = 1, n do
  local cap, charged = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
  store(KEYS[i], cap, math.min(cap, level_of(KEYS[i], cap, now) + charged - used), now)
end
redis.call('ZREM', KEYS[n + 1], ARGV[3])
for p = 2, tonumber(ARGV[5]) do redis.call('ZREM', KEYS[n + 1], ARGV[3] .. '#' .. p) end
return 1
"""
)


@dataclass
class RedisTicket:
    _limiter: RedisRateLimiter
    _ticket: str
    _slots_key: str
    _token_buckets: list[tuple[str, int, int]]  # key, capacity, charged
    reserved: int
    _places: int = 1
    _open: bool = field(default=True)

    def settle(self, used_tokens: int) -> None:
        # Called where no await is possible (a stream's cleanup): the script runs as a task.
        if self._open:
            self._open = False
            self._limiter._settle_later(self, used_tokens)


class RedisRateLimiter:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mimoserve",
        lease_s: float = 600.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._prefix = prefix
        # A dead replica's slots come back when their lease ends; a running request's
        # lease is renewed as long as it runs (however long that is).
        self._lease_s = lease_s
        self.leases = LeaseRenewer(self._redis, lease_s, set_ttl_s=math.ceil(lease_s) + 1)
        self._clock = clock  # tests only; None uses Redis's clock
        self._settlements = Settlements()

    def _now(self) -> float:
        return -1.0 if self._clock is None else self._clock()

    def _slots_key(self, key_id: str) -> str:
        return f"{self._prefix}:inflight:{key_id}"

    async def acquire(
        self, *, account_id: str, key_id: str, model: str, account_limits: Limits,
        key_limits: Limits, tokens: int, places: int = 1,
    ) -> RedisTicket:  # fmt: skip
        effective = account_limits.overridden_by(key_limits)
        found = charges(
            account_id=account_id, key_id=key_id, model=model,
            account_limits=account_limits, key_limits=key_limits, tokens=tokens,
        )  # fmt: skip
        keys = [f"{self._prefix}:{':'.join(charge.name)}" for charge in found]
        ticket = secrets.token_hex(8)
        slots = self._slots_key(key_id)
        args: list[str | int | float] = [
            self._now(), len(found),
            -1 if effective.max_concurrent is None else effective.max_concurrent,
            ticket, self._lease_s, places,
        ]  # fmt: skip
        for charge in found:
            args += [charge.capacity, charge.cost]
        try:
            result = await self._admit(keys=[*keys, slots], args=args)
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        if int(result[0]) != 1:
            if int(result[1]) == -1:
                assert effective.max_concurrent is not None
                raise too_many_in_flight(effective.max_concurrent, places)
            raise short_of(found[int(result[1]) - 1], float(result[2]))
        token_buckets = [
            (key, charge.capacity, charge.cost)
            for key, charge in zip(keys, found, strict=True)
            if charge.is_tokens
        ]
        self.leases.hold(ticket, (slots,), places)
        return RedisTicket(self, ticket, slots, token_buckets, tokens, places)

    def _settle_later(self, ticket: RedisTicket, used_tokens: int) -> None:
        self.leases.release(ticket._ticket)
        self._settlements.start(self._settle_now(ticket, used_tokens))

    async def _settle_now(self, ticket: RedisTicket, used_tokens: int) -> None:
        args: list[str | int | float] = [
            self._now(),
            len(ticket._token_buckets),
            ticket._ticket,
            used_tokens,
            ticket._places,
        ]
        for _, capacity, charged in ticket._token_buckets:
            args += [capacity, charged]
        keys = [b[0] for b in ticket._token_buckets] + [ticket._slots_key]
        try:
            await self._settle(keys=keys, args=args)
        except RedisError as exc:
            # The reservation stands and the slot's lease ends it: limits err on the safe side.
            log.warning("could not settle a rate-limit ticket in redis: %s", exc)

    async def in_flight(self, key_id: str) -> int:
        now = self._clock() if self._clock is not None else (await self._redis.time())[0]
        return int(await self._redis.zcount(self._slots_key(key_id), f"({now}", "+inf"))

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def drain(self) -> None:
        await self._settlements.drain()

    async def close(self) -> None:
        await self.leases.close()
        await self.drain()
        await self._redis.aclose()
