"""Two server processes share PostgreSQL and Redis: one account's limit holds across both.

Each process runs its own llama.cpp engine with one thread and passive OpenMP waiting,
so the two engines split this machine's cores instead of spinning against each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from mimoserve.auth.keys import KeyStore
from mimoserve.billing.budgets import Budget, BudgetStore
from mimoserve.limits.policy import Limits
from mimoserve.store.postgres import PostgresDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.e2e.server import RunningServer, running_server

CHAT = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 1}  # fmt: skip
ONE_CORE = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@contextmanager
def two_servers(home: Path, postgres_url: str, redis_url: str) -> Iterator[list[RunningServer]]:
    """Two real server processes, one core each, sharing PostgreSQL and Redis."""
    shared = ("--n-threads", "1", "--n-parallel", "2", "--n-ctx", "512")
    env = {**ONE_CORE, "MIMOSERVE_DATABASE_URL": postgres_url, "MIMOSERVE_REDIS_URL": redis_url}
    with ExitStack() as stack:
        yield [stack.enter_context(running_server(home / name, *shared, env=env))
               for name in ("one", "two")]  # fmt: skip


def test_one_accounts_limit_holds_across_two_processes(
    weights_path: Path, tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    database = PostgresDatabase(postgres_url)
    keys = KeyStore(database)
    team = keys.create_account("team", Limits(rpm=6))
    key_a = keys.create("a", account_id=team.id).secret
    key_b = keys.create("b", account_id=team.id).secret  # the limit is summed over keys
    with two_servers(tmp_path, postgres_url, redis_url) as servers:
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


def test_one_accounts_budget_holds_across_two_processes(
    weights_path: Path, tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """Concurrent requests through two processes draw from one token budget in Redis:
    it is spent until the next request's whole possible use no longer fits, never
    overspent, and the refusals are 402 `insufficient_quota`."""
    database = PostgresDatabase(postgres_url)
    keys = KeyStore(database)
    team = keys.create_account("team")
    secrets = [keys.create(name, account_id=team.id).secret for name in ("a", "b")]
    budget = 300
    BudgetStore(database).set(Budget("account", team.id, "tokens", budget, "day"))
    # `user` pads the body, so each reservation (body size / 3 + max tokens) is more
    # than the request really uses.
    chat = {**CHAT, "user": "u" * 300}
    claim = math.ceil(len(json.dumps(chat)) / 3) + 1  # max_completion_tokens 1
    with two_servers(tmp_path, postgres_url, redis_url) as servers:

        def send(i: int) -> tuple[int, httpx.Response]:
            response = httpx.post(f"{servers[i % 2].base_url}/v1/chat/completions", json=chat,
                                  headers={"api-key": secrets[i // 2 % 2]}, timeout=120)  # fmt: skip
            return i % 2, response

        # Waves of concurrent requests; a wave refused whole, with nothing left in flight
        # from earlier waves, means the budget really is spent.
        results: list[tuple[int, httpx.Response]] = []
        with ThreadPoolExecutor(4) as pool:
            for _ in range(40):
                wave = list(pool.map(send, range(4)))
                results += wave
                if all(r.status_code == 402 for _, r in wave):
                    break
    served = [(server, r.json()["usage"]["total_tokens"]) for server, r in results
              if r.status_code == 200]  # fmt: skip
    refused = [r for _, r in results if r.status_code == 402]
    assert len(served) + len(refused) == len(results), [r.text for _, r in results]
    assert {server for server, _ in served} == {0, 1}, "both processes served part of it"
    assert refused and all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    spent = sum(tokens for _, tokens in served)
    # Refused once a whole claim no longer fits in what is left: never over the budget.
    assert budget - claim <= spent <= budget, (spent, claim)
    records = SqlUsageStore(database).records()
    assert sum(r.prompt_tokens + r.completion_tokens for r in records) == spent
    assert sorted(r.status for r in records) == sorted(r.status_code for _, r in results)
    database.close()
