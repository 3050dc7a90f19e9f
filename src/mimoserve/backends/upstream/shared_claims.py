"""Routing claims shared by every gateway through Redis, so that a conversation's next
turn finds the replica that holds its prefix whichever gateway it reaches.

A prompt block (routing.py) is a sorted set whose members are the replicas (by URL, the
same on every gateway) that were sent it, scored by when (Redis's clock); it expires
`ttl_s` after its last claim, as an engine's cache forgets what nobody asks for. A
replica whose breaker opens is "forgotten": the time is written once, and claims older
than it stop counting, so no gateway has to walk every block.

One script reads a prompt's leading blocks and answers each replica's depth (how many
leading blocks it holds, all of them); one script writes a routed prompt's claims. Both
are one round trip. Writes run beside the request (they never delay it); a Redis that
fails or is slow leaves routing to what this gateway knows itself, with a log line, and
is not asked again for `RETRY_AFTER_S` (a hung Redis costs one timeout per interval, not
one per request).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

from mimoserve.store.redis_scripts import Settlements

log = logging.getLogger(__name__)

CLAIM_TTL_S = 3600
RETRY_AFTER_S = 5.0

# KEYS: the forgotten-at hash, then the prompt's block keys in order.
# Returns {member, depth, ...} for every replica holding at least the first block.
_HELD = """
local forgot = {}
local f = redis.call('HGETALL', KEYS[1])
for i = 1, #f, 2 do forgot[f[i]] = tonumber(f[i + 1]) end
local alive, depth = nil, {}
for i = 2, #KEYS do
  local members = redis.call('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  local here, any = {}, false
  for j = 1, #members, 2 do
    local m, at = members[j], tonumber(members[j + 1])
    if (forgot[m] == nil or at > forgot[m]) and (alive == nil or alive[m]) then
      here[m] = true
      depth[m] = i - 1
      any = true
    end
  end
  if not any then break end
  alive = here
end
local out = {}
for m, d in pairs(depth) do
  out[#out + 1] = m
  out[#out + 1] = d
end
return out
"""

# KEYS: block keys. ARGV: member, ttl_s.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('EXPIRE', key, tonumber(ARGV[2]))
end
return 1
"""

# KEYS: the forgotten-at hash. ARGV: member.
_FORGET = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000))
return 1
"""


class RedisClaims:
    """The claims of one model's replicas, kept in Redis under `prefix`."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        replicas: Sequence[str],
        prefix: str = "mimoserve",
        ttl_s: int = CLAIM_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Routing waits on this read: a short timeout, then it routes on local knowledge.
        self._redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._held = self._redis.register_script(_HELD)
        self._claim = self._redis.register_script(_CLAIM)
        self._forget = self._redis.register_script(_FORGET)
        self._names = list(replicas)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._space = f"{prefix}:route:{model}"
        self._ttl_s = ttl_s
        self._writes = Settlements()
        self._failing = False
        self._clock = clock
        self._retry_at = 0.0

    def _key(self, block: bytes) -> str:
        return f"{self._space}:b:{block.hex()}"

    async def held(self, blocks: Sequence[bytes]) -> dict[int, int]:
        """Leading blocks of the prompt each replica holds, as every gateway claimed them."""
        if not blocks or self._clock() < self._retry_at:
            return {}
        try:
            answer = await self._held(keys=[f"{self._space}:forgot", *map(self._key, blocks)])
        except RedisError as exc:
            self._failed(exc)
            return {}
        self._failing = False
        held: dict[int, int] = {}
        for name, depth in zip(answer[::2], answer[1::2], strict=True):
            index = self._index.get(name.decode())
            if index is not None:  # a replica another gateway's registry has and ours lacks
                held[index] = int(depth)
        return held

    def claim(self, replica: int, blocks: Sequence[bytes]) -> None:
        # Not while Redis is failing: each write would wait out its timeout beside a request.
        if blocks and self._clock() >= self._retry_at:
            keys = [self._key(b) for b in blocks]
            self._writes.start(self._run(self._claim, keys, [self._names[replica], self._ttl_s]))

    def forget(self, replica: int) -> None:
        keys = [f"{self._space}:forgot"]
        self._writes.start(self._run(self._forget, keys, [self._names[replica]]))

    async def _run(self, script: object, keys: list[str], args: list[object]) -> None:
        try:
            await script(keys=keys, args=args)  # type: ignore[operator]
        except RedisError as exc:
            self._failed(exc)

    def _failed(self, exc: RedisError) -> None:
        if not self._failing:  # once per outage, not once per request
            log.warning("routing claims in Redis unavailable (%s): routing on local claims", exc)
        self._failing = True
        self._retry_at = self._clock() + RETRY_AFTER_S

    async def close(self) -> None:
        await self._writes.drain()
        await self._redis.aclose()
