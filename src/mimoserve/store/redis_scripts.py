"""What the Redis-backed counters (rate limits, budgets) share: the Lua clock and the
settlements that run after the request that owed them has ended."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

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
