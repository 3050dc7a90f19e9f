from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.store.sqlite import Database
from mimoserve.store.usage import SqlUsageStore


class FlakyStore:
    """Fails while `down` is set, like a database that went away."""

    def __init__(self) -> None:
        self.down = False
        self.batches: list[list[UsageRecord]] = []

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.batches.append(list(records))


def rec(i: int) -> UsageRecord:
    return UsageRecord(key_id="k", model="m", status=200, prompt_tokens=i)


async def test_records_are_written_in_batches_off_the_request_path() -> None:
    store = FlakyStore()
    ledger = UsageLedger(store, batch_size=10, flush_interval_s=0.05)
    ledger.start()
    for i in range(25):
        ledger.record(rec(i))
    assert store.batches == [], "recording never writes on the caller's path"
    await asyncio.sleep(0.3)
    await ledger.close()
    written = [r.prompt_tokens for batch in store.batches for r in batch]
    assert written == list(range(25))
    assert all(len(batch) <= 10 for batch in store.batches)


async def test_a_store_outage_loses_nothing() -> None:
    store = FlakyStore()
    ledger = UsageLedger(store, batch_size=5, flush_interval_s=0.02)
    ledger.start()
    store.down = True
    for i in range(12):
        ledger.record(rec(i))
    await asyncio.sleep(0.1)
    assert store.batches == [] and ledger.pending == 12
    store.down = False
    await asyncio.sleep(0.1)
    await ledger.close()
    assert [r.prompt_tokens for batch in store.batches for r in batch] == list(range(12))


async def test_close_drains_what_is_queued() -> None:
    store = FlakyStore()
    ledger = UsageLedger(store, batch_size=1000, flush_interval_s=60)
    ledger.start()
    for i in range(7):
        ledger.record(rec(i))
    await ledger.close()
    assert sum(len(b) for b in store.batches) == 7 and ledger.pending == 0


def test_sqlite_store_round_trip_and_totals(tmp_path: Path) -> None:
    store = SqlUsageStore(Database(tmp_path / "u.db"))
    store.insert_usage([
        UsageRecord("a", "m1", 200, 10, 5, 2, 3, 0.5, 0.1, "stop"),
        UsageRecord("a", "m1", 499, 8, 1, 0, 0, 0.2, 0.1, None),
        UsageRecord("b", "m2", 200, 1, 1, 0, 0, 0.1, None, "length"),
    ])  # fmt: skip
    assert [r.status for r in store.records()] == [200, 499, 200]
    totals = {(t.key_id, t.model): t for t in store.totals()}
    assert totals[("a", "m1")].requests == 2
    assert totals[("a", "m1")].prompt_tokens == 18 and totals[("a", "m1")].completion_tokens == 6
    assert totals[("b", "m2")].reasoning_tokens == 0
