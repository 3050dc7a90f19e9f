"""The usage ledger: one record per request, written off the request path in batches.

Requests only append to an in-memory queue (and to the crash journal, when there is
one: see journal.py); a background task writes what has gathered every
`flush_interval_s` (or sooner when a batch fills). `close()` drains the queue, so a
graceful shutdown loses nothing that was accepted.

A failed batch is retried record by record. A record the store refuses for its
content (an error with `refused_for_content`: writing it again would fail again) is
set aside, counted and logged, so one bad record never blocks the ledger. Any other
failure means the store is unreachable, for this record as for the rest: what is not
written goes back to the head of the queue, in order, and the next attempt waits a
little longer each time (up to `_MAX_BACKOFF_S`). A record is never set aside because
the store was down when its turn came.
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
_MAX_BACKOFF_S = 30.0  # the longest wait between two attempts while the store is down


def refused_for_content(error: BaseException) -> bool:
    """Whether the store refused the record itself (it will never take it), as opposed to
    being unreachable (it may take it later). The stores' errors say so themselves
    (`refused_for_content`), so the ledger needs no store below it."""
    return bool(getattr(error, "refused_for_content", False)) or isinstance(
        error, ValueError | TypeError
    )


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
        self._in_flight = 0  # taken from the queue, being written now
        self._failures = 0  # attempts in a row that found the store down
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
        """Records accepted and not yet in the store (queued or being written)."""
        return len(self._queue) + self._in_flight

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
                await asyncio.wait_for(self._wake.wait(), self._wait_s())
            self._wake.clear()
            await self.flush()

    def _wait_s(self) -> float:
        """The flush interval, doubled for each attempt in a row that found the store
        down (so an outage is not hammered), back to normal after a success."""
        if not self._failures:
            return self._interval
        return min(_MAX_BACKOFF_S, self._interval * 2.0 ** min(self._failures, 16))

    async def flush(self) -> None:
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            self._in_flight = len(batch)
            try:
                await asyncio.to_thread(self._store.insert_usage, batch)
            except Exception:
                if not await self._write_one_by_one(batch):
                    self._failures += 1
                    return
            finally:
                self._in_flight = 0
            self._failures = 0
        if self._journal is not None:
            # Nothing is queued: every journaled record is in the database.
            self._journal.clear()

    async def _write_one_by_one(self, batch: list[UsageRecord]) -> bool:
        """Writes the batch record by record, setting aside those refused for their
        content. False when the store is down: the record that found it down and all
        after it go back to the head of the queue, in order."""
        for position, record in enumerate(batch):
            try:
                await asyncio.to_thread(self._store.insert_usage, [record])
            except Exception as error:
                if not refused_for_content(error):
                    self._queue.extendleft(reversed(batch[position:]))
                    log.warning(
                        "the usage store is unavailable (%s); %d records wait for it",
                        error, len(self._queue),
                    )  # fmt: skip
                    return False
                self.set_aside.append(record)
                self.set_aside_total += 1
                log.error("usage record set aside, the store refuses it: %r (%s)", record, error)
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
