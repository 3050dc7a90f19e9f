"""`kill -9` under concurrent load: after a restart the database opens cleanly, keys still
work, and every request that got a complete answer is in the usage ledger (the crash
journal; records used to wait in memory for the batched writer and died with it)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mimoserve.store.base import Database
from mimoserve.store.postgres import PostgresDatabase
from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.e2e.server import RunningServer, running_server

URL = "/v1/chat/completions"
KILL_AFTER = 20  # complete answers before the kill


def _load_until_killed(server: RunningServer) -> set[str]:
    """Six clients send short requests (half streamed); the server is killed with SIGKILL
    the moment the 20th complete answer arrives. Returns the ids of complete answers."""
    completed: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=server.base_url, headers={"api-key": server.api_key},
                          timeout=60) as http:  # fmt: skip
            i = 0
            while not killed.is_set():
                i += 1
                body = {"model": "mimo-v2-flash", "max_completion_tokens": 6,
                        "messages": [{"role": "user", "content": f"Say a word ({n}.{i})"}],
                        "stream": i % 2 == 0}  # fmt: skip
                try:
                    answer_id = _complete_answer(http, body)
                except (httpx.TransportError, ValueError):
                    return  # the server is gone
                if answer_id is None:
                    continue
                with lock:
                    completed.add(answer_id)
                    if len(completed) >= KILL_AFTER and not killed.is_set():
                        server.process.kill()  # SIGKILL: no shutdown, no drain
                        killed.set()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(client, range(6)))
    server.process.wait(timeout=30)
    return completed


def _complete_answer(http: httpx.Client, body: dict[str, object]) -> str | None:
    """The completion id, if the whole answer arrived (the finish reason, and [DONE])."""
    if not body["stream"]:
        response = http.post(URL, json=body)
        data = response.json()
        return (
            data["id"]
            if response.status_code == 200 and data["choices"][0]["finish_reason"]
            else None
        )
    answer_id, done = None, False
    with http.stream("POST", URL, json=body) as response:
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {") and '"finish_reason":"' in line:
                answer_id = line.split('"id":"', 1)[1].split('"', 1)[0]
    return answer_id if done else None


def _crash_and_recover(home: Path, database: Database, env: dict[str, str] | None) -> None:
    shared = ("--n-parallel", "4", "--n-ctx", "512")
    with running_server(home, *shared, env=env) as first:
        key = first.api_key
        completed = _load_until_killed(first)
    assert len(completed) >= KILL_AFTER
    with running_server(home, *shared, env=env) as second:
        response = httpx.post(f"{second.base_url}{URL}", headers={"api-key": key}, timeout=60,
                              json={"model": "mimo-v2-flash", "max_completion_tokens": 2,
                                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert response.status_code == 200, "the key issued before the crash still works"
        store = SqlUsageStore(database)
        deadline = time.monotonic() + 15
        while True:
            recorded = {r.request_id for r in store.records()}
            if completed <= recorded or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert completed <= recorded, f"lost: {sorted(completed - recorded)}"
        assert "recovered" in second.log()  # the dead process's journal was taken over
    # Replayed records are not counted twice.
    ids = [r.request_id for r in store.records() if r.request_id]
    assert len(ids) == len(set(ids))


def test_kill_9_under_load_loses_no_usage_on_sqlite(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    database = SqliteDatabase(home / "mimoserve.db")
    _crash_and_recover(home, database, None)
    database.close()


def test_kill_9_under_load_loses_no_usage_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    database = PostgresDatabase(postgres_url)
    _crash_and_recover(tmp_path / "home", database, {"MIMOSERVE_DATABASE_URL": postgres_url})
    database.close()


@pytest.fixture(autouse=True)
def _weights_pulled(weights_path: Path) -> None:
    """The servers here load SmolLM2 from the shared models folder."""
