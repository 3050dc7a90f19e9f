from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.store.sqlite import Database
from mimoserve.store.usage import SqlUsageStore
from tests.waiting import until


class FlakyStore:
    """Fails while `down` is set, like a database that went away."""

    def __init__(self) -> None:
        self.down = False
        self.attempts = 0
        self.batches: list[list[UsageRecord]] = []

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
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
    await until(lambda: ledger.pending == 0, "the background task wrote every record")
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
    await until(lambda: store.attempts >= 3, "the ledger tried the store while it was down")
    assert store.batches == [] and ledger.pending == 12 and ledger.set_aside_total == 0
    store.down = False
    await until(lambda: ledger.pending == 0, "the ledger wrote everything once the store came back")
    await ledger.close()
    assert [r.prompt_tokens for batch in store.batches for r in batch] == list(range(12))


class ComesBackStore(FlakyStore):
    """Down for its first `failures` writes, then up: the store returns while the ledger
    is retrying a batch record by record."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("store down")
        self.batches.append(list(records))


async def test_a_store_that_comes_back_mid_retry_sets_nothing_aside() -> None:
    # The batch write and the first one-by-one write find the store down; the second
    # record's write succeeds. The first record was not refused for its content: it must
    # be written, not set aside (it used to be, and the journal was cleared after it).
    store = ComesBackStore(failures=2)
    ledger = UsageLedger(store, batch_size=5, flush_interval_s=0.01)
    ledger.start()
    for i in range(5):
        ledger.record(rec(i))
    await until(lambda: ledger.pending == 0, "every record written")
    await ledger.close()
    assert ledger.set_aside_total == 0
    assert sorted(r.prompt_tokens for batch in store.batches for r in batch) == list(range(5))


async def test_the_ledger_backs_off_while_the_store_is_down() -> None:
    store = FlakyStore()
    ledger = UsageLedger(store, batch_size=5, flush_interval_s=0.01)
    store.down = True
    ledger.record(rec(0))
    for _ in range(4):
        await ledger.flush()
    assert ledger._wait_s() > 0.01 * 8  # doubled for each failed attempt
    store.down = False
    await ledger.flush()
    assert ledger._wait_s() == 0.01 and ledger.pending == 0


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
