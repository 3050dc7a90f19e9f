"""The usage ledger: one record per request, written off the request path in batches.

Requests only append to an in-memory queue (and to the crash journal, when there is
one: see journal.py); a background task writes what has gathered every
`flush_interval_s` (or sooner when a batch fills). `close()` drains the queue, so a
graceful shutdown loses nothing that was accepted.

A failed batch is retried record by record. If none can be written, the store is down:
everything stays queued, in order, for the next attempt. If some can and others
cannot, those others can never be written (a value the database refuses): they are set
aside, counted and logged, so one bad record never blocks the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from mimoserve.metering.journal import UsageJournal
from mimoserve.metering.records import UsageRecord, sanitized

__all__ = ["UsageLedger", "UsageRecord", "UsageStore"]

log = logging.getLogger(__name__)

_SET_ASIDE_KEPT = 100  # the latest refused records, kept in memory for inspection


class UsageStore(Protocol):
    def insert_usage(self, records: Sequence[UsageRecord]) -> None: ...


class UsageLedger:
    def __init__(
        self,
        store: UsageStore,
        *,
        batch_size: int = 200,
        flush_interval_s: float = 0.5,
        journal: UsageJournal | None = None,
    ) -> None:
        self._store = store
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._journal = journal
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One flush at a time: a flush returns once everything recorded before it is
        # written, even the batch another flush (the background one) was writing.
        self._flushing = asyncio.Lock()
        self._closing = False
        self.set_aside: deque[UsageRecord] = deque(maxlen=_SET_ASIDE_KEPT)
        self.set_aside_total = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, record: UsageRecord) -> None:
        record = sanitized(record)
        if self._journal is not None:
            self._journal.append(record)
        self._queue.append(record)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def adopt(self, records: Sequence[UsageRecord]) -> None:
        """Records recovered from a dead process's journal (already sanitised once)."""
        for record in records:
            self.record(record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                await asyncio.to_thread(self._store.insert_usage, batch)
            except Exception:
                if not await self._write_one_by_one(batch):
                    return
        if self._journal is not None:
            # Nothing is queued: every journaled record is in the database.
            self._journal.clear()

    async def _write_one_by_one(self, batch: list[UsageRecord]) -> bool:
        """False when the store took none of them (down): all are queued again."""
        refused: list[tuple[UsageRecord, Exception]] = []
        written = 0
        for record in batch:
            try:
                await asyncio.to_thread(self._store.insert_usage, [record])
                written += 1
            except Exception as error:
                refused.append((record, error))
        if written == 0:
            self._queue.extendleft(reversed(batch))
            log.warning("writing %d usage records failed; will retry", len(batch))
            return False
        for record, exc in refused:
            self.set_aside.append(record)
            self.set_aside_total += 1
            log.error("usage record set aside, the store refuses it: %r (%s)", record, exc)
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._queue:
            # They stay in the journal, replayed at the next start.
            log.error("%d usage records could not be written at shutdown", len(self._queue))
        if self._journal is not None:
            self._journal.close(remove=not self._queue)
