"""The store tests, run on SQLite and on a real PostgreSQL server alike."""

from __future__ import annotations

import threading
import time

import pytest

from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import ConflictError, KeyStore
from mimoserve.limits.policy import Limits
from mimoserve.metering.ledger import UsageRecord
from mimoserve.store.base import Database, StoreError
from mimoserve.store.postgres import MIGRATIONS as PG_MIGRATIONS
from mimoserve.store.postgres import PostgresDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.services import postgres_server


def test_accounts_and_keys_with_their_policies(any_database: Database) -> None:
    keys = KeyStore(any_database)
    team = keys.create_account("team", Limits(rpm=60, tpm=1000))
    with pytest.raises(ConflictError):
        keys.create_account("team")
    with pytest.raises(KeyError):
        keys.create("orphan", account_id="no-such-account")
    issued = keys.create(
        "ci", account_id=team.id, allowed_models=frozenset({"mimo-v2-flash"}),
        limits=Limits(rpm=5, max_concurrent=2), expires_at=time.time() + 3600,
    )  # fmt: skip
    principal = keys.authenticate(issued.secret)
    assert principal is not None
    assert principal.account_id == team.id
    assert principal.allowed_models == frozenset({"mimo-v2-flash"})
    assert principal.account_limits == Limits(rpm=60, tpm=1000)
    assert principal.key_limits == Limits(rpm=5, max_concurrent=2)
    assert keys.account(team.id) == team
    assert [a.name for a in keys.accounts()] == ["default", "team"]
    assert keys.set_account_limits(team.id, Limits(rpm=1))
    assert keys.account(team.id).limits.rpm == 1  # type: ignore[union-attr]
    [listed] = keys.list(team.id)
    assert listed.last_used_at is not None and listed.prefix == issued.secret[:13]
    assert keys.count_active() == 1


def test_revoked_expired_and_forged_keys_are_refused(any_database: Database) -> None:
    keys = KeyStore(any_database)
    live, old = keys.create("live"), keys.create("old", expires_at=time.time() - 1)
    assert keys.authenticate(old.secret) is None
    forged = live.secret[:-4] + "AAAA"
    assert keys.authenticate(forged) is None
    assert keys.revoke(live.info.id) and not keys.revoke(live.info.id)
    assert keys.authenticate(live.secret) is None


def test_only_hashes_are_stored(any_database: Database) -> None:
    issued = KeyStore(any_database).create("secret")
    token = AdminCredential(any_database).rotate()
    with any_database.transaction() as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
        admin_rows = conn.execute("SELECT * FROM admin_credentials").fetchall()
    stored = repr([dict(r) for r in rows + admin_rows])
    assert issued.secret.split("_", 1)[1] not in stored and token not in stored


def test_admin_credential(any_database: Database) -> None:
    admin = AdminCredential(any_database)
    first = admin.ensure()
    assert first is not None and admin.ensure() is None and admin.verify(first)
    second = admin.rotate()
    assert admin.verify(second) and not admin.verify(first)


def test_usage_round_trip_and_totals(any_database: Database) -> None:
    store = SqlUsageStore(any_database)
    store.insert_usage([
        UsageRecord("a", "m1", 200, 10, 5, 2, 3, 0.5, 0.1, "stop", request_id="r1",
                    draft_tokens=12, accepted_draft_tokens=9),
        UsageRecord("a", "m1", 499, 8, 1, 0, 0, 0.2, 0.1, None, account_id="acc",
                    draft_tokens=4, accepted_draft_tokens=1),
        UsageRecord("b", "m2", 200, 1, 1, 0, 0, 0.1, None, "length"),
    ])  # fmt: skip
    records = store.records()
    assert [r.status for r in records] == [200, 499, 200]
    assert records[0].request_id == "r1" and records[1].account_id == "acc"
    assert records[0].created_at == pytest.approx(time.time(), abs=60)  # full-precision times
    totals = {(t.key_id, t.model): t for t in store.totals()}
    assert totals[("a", "m1")].requests == 2
    assert totals[("a", "m1")].prompt_tokens == 18 and totals[("a", "m1")].completion_tokens == 6
    assert type(totals[("a", "m1")].prompt_tokens) is int
    assert records[0].draft_tokens == 12 and records[0].accepted_draft_tokens == 9
    assert (totals[("a", "m1")].draft_tokens, totals[("a", "m1")].accepted_draft_tokens) == (16, 10)
    assert store.totals(since=time.time() + 60) == []


def test_concurrent_authentication_from_threads(any_database: Database) -> None:
    keys = KeyStore(any_database)
    issued = keys.create("busy")
    results: list[bool] = []

    def worker() -> None:
        for _ in range(25):
            results.append(keys.authenticate(issued.secret) is not None)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 200


def test_postgres_migrations_run_once_for_replicas(postgres_url: str) -> None:
    first, second = PostgresDatabase(postgres_url), PostgresDatabase(postgres_url)
    issued = KeyStore(first).create("shared")
    assert KeyStore(second).authenticate(issued.secret) is not None
    with second.transaction() as conn:
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
    assert [row["version"] for row in versions] == list(range(1, len(PG_MIGRATIONS) + 1))
    first.close()
    second.close()


@pytest.mark.services
def test_postgres_outage_raises_store_error_then_recovers() -> None:
    with postgres_server() as cluster:
        db = PostgresDatabase(cluster.url, timeout_s=1.0)
        keys = KeyStore(db)
        issued = keys.create("k")
        cluster.stop()
        # Callers get StoreError (a 503 at the API), never a driver error or a hang.
        with pytest.raises(StoreError):
            keys.authenticate(issued.secret)
        cluster.start()
        # The pool reconnects in the background with backoff (1 s, doubling): the first
        # calls after the restart may still fail, then it serves again.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert keys.authenticate(issued.secret) is not None
                break
            except StoreError:
                assert time.monotonic() < deadline, "did not recover within 30 s"
                time.sleep(0.2)
        db.close()


def test_usage_series_buckets_by_time_model_and_key(any_database: Database) -> None:
    store = SqlUsageStore(any_database)
    base = 1_700_000_000.0  # 800 s into an hour
    store.insert_usage([
        UsageRecord("a", "m1", 200, 10, 5, created_at=base + 100),
        UsageRecord("a", "m1", 200, 1, 1, created_at=base + 2799),
        UsageRecord("a", "m1", 200, 2, 2, created_at=base + 2801),  # next hour
        UsageRecord("b", "m1", 200, 3, 3, created_at=base + 2801),
        UsageRecord("a", "m2", 200, 4, 4, created_at=base + 2900),
    ])  # fmt: skip
    points = [(p.start, p.model, p.key_id, p.requests, p.prompt_tokens, p.completion_tokens)
              for p in store.series(since=base, step_s=3600)]  # fmt: skip
    hour = 1_700_000_000 // 3600 * 3600
    assert points == [
        (hour, "m1", "a", 2, 11, 6),
        (hour + 3600, "m1", "a", 1, 2, 2),
        (hour + 3600, "m1", "b", 1, 3, 3),
        (hour + 3600, "m2", "a", 1, 4, 4),
    ]
