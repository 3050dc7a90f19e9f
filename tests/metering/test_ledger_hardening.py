"""A record the database refuses never blocks the ledger; a killed process loses nothing."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from mimoserve.metering.journal import UsageJournal, adopt_orphans, read_journal
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.metering.records import sanitized
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore


def rec(i: int, model: str = "m") -> UsageRecord:
    return UsageRecord(key_id="k", model=model, status=200, prompt_tokens=i)


class PickyStore:
    """Refuses any batch holding a record whose model is "poison", like PostgreSQL with a
    value it cannot store; a ledger that retries that batch whole never writes again."""

    def __init__(self) -> None:
        self.written: list[UsageRecord] = []

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        if any(r.model == "poison" for r in records):
            raise ValueError("invalid byte sequence")
        self.written.extend(records)


async def test_a_record_the_store_refuses_is_set_aside_and_the_rest_written() -> None:
    store = PickyStore()
    ledger = UsageLedger(store, batch_size=10)
    for i in range(25):
        ledger.record(rec(i, "poison" if i == 3 else "m"))
    await ledger.flush()
    assert [r.prompt_tokens for r in store.written] == [i for i in range(25) if i != 3]
    assert ledger.pending == 0
    assert ledger.set_aside_total == 1 and ledger.set_aside[0].prompt_tokens == 3
    ledger.record(rec(99))
    await ledger.flush()
    assert store.written[-1].prompt_tokens == 99


async def test_strings_with_nul_and_lone_surrogates_reach_any_database(
    any_database: Database,
) -> None:
    # A refused request records the model the client named: PostgreSQL refuses NUL.
    store = SqlUsageStore(any_database)
    ledger = UsageLedger(store)
    ledger.record(rec(1, model="mimo\x00v2\ud800"))
    ledger.record(rec(2))
    await ledger.flush()
    assert ledger.set_aside_total == 0
    models = [r.model for r in store.records()]
    assert models == ["mimo\ufffdv2?", "m"]


def test_sanitizing_leaves_clean_records_alone() -> None:
    record = rec(1)
    assert sanitized(record) is record


async def test_records_replayed_from_a_journal_are_not_counted_twice(
    any_database: Database,
) -> None:
    store = SqlUsageStore(any_database)
    record = rec(7)
    store.insert_usage([record])
    store.insert_usage([record, rec(8)])  # the first was already written before a crash
    assert sorted(r.prompt_tokens for r in store.records()) == [7, 8]


@pytest.mark.slow  # kills a subprocess
async def test_a_killed_process_journal_is_adopted_by_the_next_one(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    # Another process journals two records and dies before its ledger writes them.
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from mimoserve.metering.journal import UsageJournal\n"
        "from mimoserve.metering.ledger import UsageRecord\n"
        "j = UsageJournal(Path(sys.argv[1]))\n"
        "for i in (1, 2): j.append(UsageRecord(key_id='k', model='m', status=200, prompt_tokens=i))\n"
        "os.write(j._fd, b'{\"torn')\n"  # killed in the middle of a third line
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(folder)], check=False)
    orphans = list(folder.glob("usage-*.jsonl"))
    assert len(orphans) == 1 and [r.prompt_tokens for r in read_journal(orphans[0])] == [1, 2]

    store = PickyStore()
    journal = UsageJournal(folder)
    ledger = UsageLedger(store, journal=journal)
    assert adopt_orphans(folder, ledger.adopt, own=journal.path) == 2
    assert not orphans[0].exists()
    # Adopted records are in this process's journal until they are written.
    assert [r.prompt_tokens for r in read_journal(journal.path)] == [1, 2]
    await ledger.flush()
    assert [r.prompt_tokens for r in store.written] == [1, 2]
    assert journal.path.stat().st_size == 0  # all written: the journal is emptied
    await ledger.close()
    assert not journal.path.exists()


def test_a_live_process_journal_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    live = UsageJournal(folder)
    live.append(rec(1))
    taken: list[UsageRecord] = []
    # A second journal in the same folder (another live process) is not adopted.
    pid = os.fork()
    if pid == 0:  # the child holds nothing: it checks the parent's journal
        count = adopt_orphans(folder, taken.extend)
        os._exit(0 if count == 0 and live.path.exists() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    live.close(remove=True)


def test_record_fields_round_trip_through_the_journal(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    record = dataclasses.replace(rec(3), ttft_s=0.25, finish_reason="stop", request_id="r1")
    journal.append(record)
    assert read_journal(journal.path) == [record]
    journal.close(remove=True)


async def test_set_aside_records_show_in_metrics() -> None:
    from mimoserve.metering.metrics import Metrics

    ledger = UsageLedger(PickyStore())
    metrics = Metrics(ledger_probe=lambda: (ledger.pending, ledger.set_aside_total))
    ledger.record(rec(1, "poison"))
    ledger.record(rec(2))
    await ledger.flush()
    text = metrics.render().decode()
    assert "mimoserve:usage_records_set_aside 1.0" in text
    assert "mimoserve:usage_records_pending 0.0" in text
