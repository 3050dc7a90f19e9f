"""What the Redis-backed counters (rate limits, budgets) share: the Lua clock and the
settlements that run after the request that owed them has ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

# `now_s(-1)` is Redis's clock (replicas with skewed clocks still agree); tests pass a time.
LUA_NOW = """
local function now_s(given)
  if given >= 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""


class Settlements:
    """Scripts started where no await is possible (a stream's cleanup), kept until done
    so that shutdown can wait for them."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending))


# KEYS: sorted sets of leases. ARGV: lease_s, set ttl (0: leave it), then tickets. Pushes
# the leases of requests still running forward from Redis's clock; XX: a ticket settled
# meanwhile is not brought back.
_RENEW = (
    LUA_NOW
    + """
local ends = now_s(-1) + tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
for _, z in ipairs(KEYS) do
  for i = 3, #ARGV do redis.call('ZADD', z, 'XX', ends, ARGV[i]) end
  if ttl > 0 and redis.call('EXISTS', z) == 1 then redis.call('EXPIRE', z, ttl) end
end
return 1
"""
)


class LeaseRenewer:
    """Keeps the leases of running requests alive.

    A reservation in Redis (a concurrency slot, a budget hold) carries a lease so that
    what a dead replica held comes back; but a live request may run far longer than any
    fixed lease (reading a 20,000-token prompt on a CPU takes minutes). So while a
    request runs, its leases are pushed forward every third of a lease: a live holder
    never loses its hold, a dead one's ends within one lease."""

    def __init__(self, client: Any, lease_s: float, *, set_ttl_s: int = 0) -> None:
        self._redis = client
        self._script = client.register_script(_RENEW)
        self._lease_s = lease_s
        self._set_ttl_s = set_ttl_s
        self._held: dict[str, tuple[str, ...]] = {}  # ticket -> its lease sets
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # renewals done (tests wait on it)

    def hold(self, ticket: str, lease_sets: tuple[str, ...], places: int = 1) -> None:
        """Renews `ticket` (and, for a request of several places, `ticket#2`, ...)."""
        self._held[ticket] = lease_sets
        for place in range(2, places + 1):
            self._held[f"{ticket}#{place}"] = lease_sets
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="leases")

    def release(self, ticket: str) -> None:
        for name in [t for t in self._held if t == ticket or t.startswith(ticket + "#")]:
            del self._held[name]

    async def _run(self) -> None:
        while self._held:
            await asyncio.sleep(self._lease_s / 3)
            held = dict(self._held)
            if not held:
                return
            sets = sorted({key for keys in held.values() for key in keys})
            try:
                await self._script(keys=sets, args=[self._lease_s, self._set_ttl_s, *held])
                self.rounds += 1
            except Exception as exc:  # the next round tries again; a lease is 3 rounds
                log.warning("could not renew leases in redis: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
