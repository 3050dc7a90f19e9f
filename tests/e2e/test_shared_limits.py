"""Two server processes share PostgreSQL and Redis: one account's limit holds across both.

Each process runs its own llama.cpp engine with one thread and passive OpenMP waiting,
so the two engines split this machine's cores instead of spinning against each other.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx

from mimoserve.auth.keys import KeyStore
from mimoserve.limits.policy import Limits
from mimoserve.store.postgres import PostgresDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.e2e.server import running_server

CHAT = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 1}  # fmt: skip
ONE_CORE = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def test_one_accounts_limit_holds_across_two_processes(
    weights_path: Path, tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    database = PostgresDatabase(postgres_url)
    keys = KeyStore(database)
    team = keys.create_account("team", Limits(rpm=6))
    key_a = keys.create("a", account_id=team.id).secret
    key_b = keys.create("b", account_id=team.id).secret  # the limit is summed over keys
    shared = ("--n-threads", "1", "--n-parallel", "2", "--n-ctx", "512")
    env = {**ONE_CORE, "MIMOSERVE_DATABASE_URL": postgres_url, "MIMOSERVE_REDIS_URL": redis_url}
    with ExitStack() as stack:
        servers = [
            stack.enter_context(running_server(tmp_path / name, *shared, env=env))
            for name in ("one", "two")
        ]
        statuses: list[tuple[int, int]] = []  # (server, status)
        for i in range(14):
            server, key = servers[i % 2], (key_a, key_b)[i // 2 % 2]
            response = httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT,
                                  headers={"api-key": key}, timeout=60)  # fmt: skip
            statuses.append((i % 2, response.status_code))
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
        served = [s for s, status in statuses if status == 200]
        assert len(served) == 6, statuses  # the account's minute, not 6 per process
        assert set(served) == {0, 1}, "both processes served part of the budget"
        assert {status for _, status in statuses} == {200, 429}

    # Both processes wrote to the one shared ledger (drained at their shutdown).
    records = SqlUsageStore(database).records()
    assert sorted(r.status for r in records) == [200] * 6 + [429] * 8
    assert {r.account_id for r in records} == {team.id}
    database.close()
