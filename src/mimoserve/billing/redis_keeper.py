"""Budgets counted in Redis, exact across replicas.

The same reserve-then-settle rule as the in-process keeper (keeper.py); each check and
charge over all of a request's budgets is one Lua script, which Redis runs atomically,
so two replicas cannot both take the last of a budget. A period's count is a hash
{spent, reserved, r:<ticket>...}; reservations also sit in a sorted set with a lease,
so what a dead replica reserved comes back when the lease ends. A count Redis does not
hold (new period, Redis restarted, expired) starts from the usage records.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from mimoserve.billing.budgets import Budget, Spend
from mimoserve.billing.keeper import Charge, SpentSince, Usage, spent_error
from mimoserve.store.base import StoreError
from mimoserve.store.redis_scripts import LUA_NOW, LeaseRenewer, Settlements

log = logging.getLogger(__name__)

_HELPERS = (
    LUA_NOW
    + """
local function keep(key, ttl)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
"""
)

# KEYS: per budget a hash and a lease set. ARGV: now (-1: Redis time), n, ticket, lease_s,
# then per budget: amount, wanted, minimum, ttl. Returns {1, granted...}; {0, i} when budget i is
# spent; {-1, i} when Redis holds no count for budget i (the caller starts it, then retries).
_RESERVE = (
    _HELPERS
    + """
local now = now_s(tonumber(ARGV[1]))
local n, ticket, lease = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local granted = {}
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('EXISTS', h) == 0 then return {-1, i} end
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now)) do
    local amount = tonumber(redis.call('HGET', h, 'r:' .. old) or '0')
    redis.call('HINCRBY', h, 'reserved', -amount)
    redis.call('HDEL', h, 'r:' .. old)
    redis.call('ZREM', z, old)
  end
  local base = 4 * i + 1
  local left = tonumber(ARGV[base]) - tonumber(redis.call('HGET', h, 'spent'))
               - tonumber(redis.call('HGET', h, 'reserved') or '0')
  if left <= 0 or left < tonumber(ARGV[base + 2]) then return {0, i} end
  granted[i] = math.min(tonumber(ARGV[base + 1]), left)
end
local answer = {1}
for i = 1, n do
  local h, z, ttl = KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[4 * i + 4])
  redis.call('HINCRBY', h, 'reserved', granted[i])
  redis.call('HSET', h, 'r:' .. ticket, granted[i])
  redis.call('ZADD', z, now + lease, ticket)
  keep(h, ttl)
  keep(z, ttl)
  answer[i + 1] = granted[i]
end
return answer
"""
)

# KEYS: a count's hash. ARGV: spent so far, ttl. Only the first replica's start counts.
_START = (
    _HELPERS
    + """
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'reserved', 0)
  keep(KEYS[1], tonumber(ARGV[2]))
end
return 1
"""
)

# KEYS: per budget a hash and a lease set, then the ticket's "settled" marker. ARGV: n,
# ticket, then per budget: used, ttl. Returns spent and reserved per budget after
# settling. Runs at most once per ticket (the marker), so a settlement whose answer was
# lost can be sent again without counting the use twice.
_SETTLE = (
    _HELPERS
    + """
local n, ticket = tonumber(ARGV[1]), ARGV[2]
local answer = {}
local marker = KEYS[2 * n + 1]
local first = redis.call('SET', marker, 1, 'NX', 'EX', 86400)
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if first and redis.call('EXISTS', h) == 1 then  -- an expired count restarts from the records
    local amount = redis.call('HGET', h, 'r:' .. ticket)
    if amount then
      redis.call('HINCRBY', h, 'reserved', -tonumber(amount))
      redis.call('HDEL', h, 'r:' .. ticket)
    end
    redis.call('ZREM', z, ticket)
    redis.call('HINCRBY', h, 'spent', tonumber(ARGV[2 * i + 1]))
    keep(h, tonumber(ARGV[2 * i + 2]))
  end
  answer[2 * i - 1] = tonumber(redis.call('HGET', h, 'spent') or '0')
  answer[2 * i] = tonumber(redis.call('HGET', h, 'reserved') or '0')
end
return answer
"""
)

_SETTLE_ATTEMPTS = 8  # about 20 s of backing off
_NO_RESET_TTL_S = 7 * 86400  # a count idle this long is dropped; the records restart it


@dataclass
class RedisHold:
    _keeper: RedisBudgetKeeper
    _ticket: str
    charges: Sequence[Charge]
    _open: bool = field(default=True)

    def settle(self, tokens: int, cost_micros: int) -> None:
        # Called where no await is possible (a stream's cleanup): the script runs as a task.
        if self._open:
            self._open = False
            self._keeper._settle_later(self, tokens, cost_micros)


class RedisBudgetKeeper:
    def __init__(
        self,
        url: str,
        spent_since: SpentSince,
        *,
        prefix: str = "mimoserve",
        lease_s: float = 600.0,
        on_change: Callable[[Budget, Spend], None] | None = None,
    ) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._reserve = self._redis.register_script(_RESERVE)
        self._start = self._redis.register_script(_START)
        self._settle = self._redis.register_script(_SETTLE)
        self._spent_since = spent_since
        self._prefix = prefix
        # How long a reservation outlives its replica. A running request's lease is
        # renewed every third of it, so a request may run for hours (a long prompt on a
        # slow CPU) without its hold lapsing; a dead replica's holds end within a lease.
        self._lease_s = lease_s
        self.leases = LeaseRenewer(self._redis, lease_s)  # the sets' ttl is the period's
        self._on_change = on_change
        self._settlements = Settlements()

    def _keys(self, counter: str) -> list[str]:
        base = f"{self._prefix}:budget:{counter}"
        return [base, base + ":leases"]

    @staticmethod
    def _ttl(budget: Budget, now: float) -> int:
        ends = budget.ends(now)
        return _NO_RESET_TTL_S if ends is None else int(ends - now) + 3600

    async def _run(
        self, script: object, keys: list[str], args: list[str | int | float]
    ) -> list[int]:
        try:
            return await script(keys=keys, args=args)  # type: ignore[operator,no-any-return]
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def _start_count(self, budget: Budget, now: float) -> None:
        spent = await asyncio.to_thread(self._spent_since, budget, budget.starts(now))
        await self._run(self._start, self._keys(budget.counter(now))[:1],
                        [spent, self._ttl(budget, now)])  # fmt: skip

    async def reserve(
        self, budgets: Sequence[Budget], wanted: Usage, minimum: Usage, now: float
    ) -> RedisHold:
        if not budgets:
            return RedisHold(self, "", [])
        ticket = secrets.token_hex(8)
        counters = [budget.counter(now) for budget in budgets]
        keys = [key for counter in counters for key in self._keys(counter)]
        args: list[str | int | float] = [-1, len(budgets), ticket, self._lease_s]
        for budget in budgets:
            args += [budget.amount, wanted.counted_by(budget), minimum.counted_by(budget),
                     self._ttl(budget, now)]  # fmt: skip
        for _ in range(len(budgets) + 1):  # at most one start per budget
            result = await self._run(self._reserve, keys, args)
            if int(result[0]) == -1:
                await self._start_count(budgets[int(result[1]) - 1], now)
                continue
            if int(result[0]) == 0:
                raise spent_error(budgets[int(result[1]) - 1])
            charges = [
                Charge(budget, counter, int(granted))
                for budget, counter, granted in zip(budgets, counters, result[1:], strict=True)
            ]
            self.leases.hold(ticket, tuple(keys[1::2]))
            return RedisHold(self, ticket, charges)
        raise StoreError("redis: a budget's count vanished while it was being started")

    def _settle_later(self, hold: RedisHold, tokens: int, cost_micros: int) -> None:
        self.leases.release(hold._ticket)
        if not hold.charges:
            return
        self._settlements.start(self._settle_now(hold, tokens, cost_micros))

    async def _settle_now(self, hold: RedisHold, tokens: int, cost_micros: int) -> None:
        now = time.time()
        keys = [key for charge in hold.charges for key in self._keys(charge.counter)]
        keys.append(f"{self._prefix}:budget-settled:{hold._ticket}")
        args: list[str | int | float] = [len(hold.charges), hold._ticket]
        for charge in hold.charges:
            args += [charge.budget.charge(tokens, cost_micros), self._ttl(charge.budget, now)]
        # A transient failure must not drop the spend from the period's count (the count
        # would then say less was spent than the records do): try again, backing off.
        # The script runs at most once per ticket, so a retry never counts twice.
        delay = 0.05
        for attempt in range(_SETTLE_ATTEMPTS):
            try:
                result = await self._run(self._settle, keys, args)
                break
            except StoreError as exc:
                if attempt == _SETTLE_ATTEMPTS - 1:
                    # Redis stays down: the use is in the usage records, and a count that
                    # Redis loses restarts from them; the lease ends the reservation.
                    log.error("could not settle a budget in redis: %s", exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self._on_change is not None:
            for i, charge in enumerate(hold.charges):
                self._on_change(charge.budget, Spend(int(result[2 * i]), int(result[2 * i + 1])))

    async def spend(self, budget: Budget, now: float) -> Spend:
        key = self._keys(budget.counter(now))[0]
        try:
            found = await self._redis.hmget(key, ["spent", "reserved"])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        if found[0] is None:
            await self._start_count(budget, now)
            return await self.spend(budget, now)
        return Spend(int(found[0]), int(found[1] or 0))

    async def drain(self) -> None:
        await self._settlements.drain()

    async def close(self) -> None:
        await self.leases.close()
        await self.drain()
        await self._redis.aclose()
