"""The usage ledger: one record per request, written off the request path in batches.

Requests only append to an in-memory queue; a background task writes what has
gathered every `flush_interval_s` (or sooner when a batch fills). A failed write keeps
the records for the next attempt, and `close()` drains the queue, so a graceful
shutdown loses nothing that was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    key_id: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    finish_reason: str | None = None
    created_at: float = field(default_factory=time.time)
    account_id: str = "default"
    request_id: str = ""  # the completion id the client saw (empty for refusals)


class UsageStore(Protocol):
    def insert_usage(self, records: Sequence[UsageRecord]) -> None: ...


class UsageLedger:
    def __init__(
        self, store: UsageStore, *, batch_size: int = 200, flush_interval_s: float = 0.5
    ) -> None:
        self._store = store
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, record: UsageRecord) -> None:
        self._queue.append(record)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                await asyncio.to_thread(self._store.insert_usage, batch)
            except Exception:
                # Keep the records, in order, for the next attempt; the store may be back.
                self._queue.extendleft(reversed(batch))
                log.exception("writing %d usage records failed; will retry", len(batch))
                return

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._queue:
            log.error("%d usage records could not be written at shutdown", len(self._queue))
