"""Many parallel clients, some leaving mid-stream: exactly one usage record per request.

A real uvicorn server on 127.0.0.1 (scripted backend: the engine is not what is tested)
is loaded by 64 concurrent clients for 30 s; a third of the streaming ones hang up after
a few chunks. After a graceful shutdown the ledger must hold one record per request, and
for every completed request the record's tokens must equal the `usage` the client got.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.limits.policy import Limits
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.registry import ModelRegistry
from mimoserve.store.sqlite import Database
from mimoserve.store.usage import SqlUsageStore
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend
from tests.services import uvicorn_in_thread

CLIENTS = 64
DURATION_S = 30.0
RPM = 2400  # a bucket of 2400 that refills 40/s: at most 3600 admissions in 30 s
MAX_CONCURRENT = 40


class EndlessScripts(ScriptedBackend):
    """Every request gets a fresh script with a random length and prompt size."""

    def __init__(self) -> None:
        super().__init__()
        self._random = random.Random(7)
        self.running = 0
        self.peak_running = 0

    async def generate(self, request: Any):  # type: ignore[no-untyped-def]
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            async for event in self._script(request):
                yield event
        finally:
            self.running -= 1

    async def _script(self, request: Any):  # type: ignore[no-untyped-def]
        # At least 10 pieces 5 ms apart: a client hanging up after 1-3 chunks always
        # leaves before its answer is finished, so every hang-up is a true abandonment.
        self.enqueue(["tok "] * self._random.randint(10, 30), delay_s=0.005,
                     prompt_tokens=self._random.randint(5, 50))  # fmt: skip
        async for event in super().generate(request):
            yield event


class Outcomes:
    def __init__(self) -> None:
        self.sent = 0
        self.completed: dict[str, dict[str, Any]] = {}  # request id -> usage the client got
        self.hung_up: set[str] = set()  # request ids the client left before the end
        self.refused = 0


async def _client(
    base: str, key: str, outcomes: Outcomes, rng: random.Random, until: float
) -> None:
    async with httpx.AsyncClient(base_url=base, headers={"api-key": key}, timeout=30) as http:
        while time.monotonic() < until:
            stream = rng.random() < 0.7
            body = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream, "stream_options": {"include_usage": True} if stream else None}  # fmt: skip
            outcomes.sent += 1
            if not stream:
                response = await http.post("/v1/chat/completions", json=body)
                if response.status_code == 429:
                    outcomes.refused += 1
                else:
                    outcomes.completed[response.json()["id"]] = response.json()["usage"]
                continue
            hang_up_after = rng.randint(1, 3) if rng.random() < 0.33 else None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code == 429:
                    outcomes.refused += 1
                    continue
                chunks = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunks += 1
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        outcomes.completed[data["id"]] = data["usage"]
                    if hang_up_after is not None and chunks >= hang_up_after:
                        outcomes.hung_up.add(data["id"])
                        break


@pytest.mark.load
def test_one_record_per_request_under_load_with_disconnects(tmp_path: Path) -> None:
    database = Database(tmp_path / "m.db")
    keys = KeyStore(database)
    account = keys.create_account("load", Limits(rpm=RPM))
    api_key = keys.create("load", account_id=account.id,
                          limits=Limits(max_concurrent=MAX_CONCURRENT)).secret  # fmt: skip
    usage_store = SqlUsageStore(database)
    ledger = UsageLedger(usage_store, batch_size=50, flush_interval_s=0.2)
    registry = ModelRegistry.from_toml(REGISTRY)
    backend = EndlessScripts()
    app = create_app(Settings(home=tmp_path), registry=registry, keys=keys, ledger=ledger,
                     admin=AdminCredential(database), usage=usage_store,
                     backends={e.id: backend for e in registry.entries()})  # fmt: skip
    outcomes = Outcomes()

    async def load(url: str) -> None:
        until = time.monotonic() + DURATION_S
        await asyncio.gather(*(
            _client(url, api_key, outcomes, random.Random(i), until) for i in range(CLIENTS)
        ))  # fmt: skip

    # Leaving the block shuts down gracefully: in-flight work ends, the ledger drains.
    with uvicorn_in_thread(app) as url:
        asyncio.run(load(url))

    records: Sequence[UsageRecord] = usage_store.records()
    by_id = {r.request_id: r for r in records if r.request_id}
    assert outcomes.sent > 1000 and len(outcomes.hung_up) > 50
    assert len(records) == outcomes.sent, "exactly one record per request"
    assert len(by_id) == outcomes.sent, "each under its own completion id"
    # Every answer a client received is recorded with exactly the tokens it was told.
    for request_id, usage in outcomes.completed.items():
        record = by_id[request_id]
        assert record.status == 200
        assert (record.prompt_tokens, record.completion_tokens) == (
            usage["prompt_tokens"], usage["completion_tokens"])  # fmt: skip
    # A client that hung up is recorded too: as abandoned (499) with what was consumed,
    # or as finished when the engine completed before the server noticed the hang-up.
    for request_id in outcomes.hung_up:
        assert by_id[request_id].status in {200, 499}
    abandoned = [r for r in records if r.status == 499]
    assert abandoned and all(r.request_id in outcomes.hung_up for r in abandoned)
    assert all(r.prompt_tokens > 0 and r.completion_tokens <= 30 for r in abandoned)
    assert not [r for r in records if r.status not in {200, 429, 499}]
    # No limit was exceeded, and the limits were really reached.
    assert sum(r.status == 429 for r in records) == outcomes.refused > 0
    assert backend.peak_running <= MAX_CONCURRENT
    admitted = len(records) - outcomes.refused
    assert admitted <= RPM + RPM / 60 * (DURATION_S + 2)
