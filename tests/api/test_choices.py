"""n > 1 through the chat completions door: choices, indices, summed usage, one record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mimoserve.app import create_app
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.base import Capabilities
from mimoserve.config import Settings
from mimoserve.errors import EngineError
from mimoserve.metering.ledger import UsageLedger
from mimoserve.registry import ModelRegistry
from tests.api.sse_client import parse_sse
from tests.api.test_usage_records import MemoryStore
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def choosing() -> ScriptedBackend:
    return ScriptedBackend(capabilities=Capabilities(context_length=2048, choices=True))


@pytest.fixture
async def served(
    settings: Settings, keys: KeyStore, choosing: ScriptedBackend, api_key: str
) -> AsyncIterator[tuple[httpx.AsyncClient, UsageLedger, MemoryStore]]:
    registry = ModelRegistry.from_toml(REGISTRY)
    store = MemoryStore()
    ledger = UsageLedger(store, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, keys=keys, ledger=ledger,
                     backends={e.id: choosing for e in registry.entries()})  # fmt: skip
    ledger.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"api-key": api_key}) as client:  # fmt: skip
        yield client, ledger, store
    await ledger.close()


async def test_n_choices_with_usage_summed_and_one_record(
    served: tuple[httpx.AsyncClient, UsageLedger, MemoryStore], choosing: ScriptedBackend
) -> None:
    client, ledger, store = served
    choosing.enqueue(["first"], prompt_tokens=11)
    choosing.enqueue(["second", " one"], prompt_tokens=11, reason="length")
    choosing.enqueue(["third"], prompt_tokens=11)
    response = await client.post(URL, json={**BODY, "n": 3, "seed": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(c["message"]["content"] for c in body["choices"]) == [
        "first", "second one", "third"]  # fmt: skip
    assert sorted(c["finish_reason"] for c in body["choices"]) == ["length", "stop", "stop"]
    assert body["usage"]["prompt_tokens"] == 11  # the prompt once
    assert body["usage"]["completion_tokens"] == 4  # every choice's tokens
    seeds = [r.sampling.seed for r in choosing.requests]
    assert sorted(s for s in seeds if s is not None) == [
        5,
        6,
        7,
    ]  # each choice its own seed: they differ, and repeat
    await ledger.flush()
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in store.records] == [
        (200, 11, 4)]  # fmt: skip


async def test_streamed_choices_carry_their_index(
    served: tuple[httpx.AsyncClient, UsageLedger, MemoryStore], choosing: ScriptedBackend
) -> None:
    client, _, _ = served
    choosing.enqueue(["a", "b"], delay_s=0.01)
    choosing.enqueue(["c", "d"], delay_s=0.01)
    response = await client.post(URL, json={**BODY, "n": 2, "stream": True,
                                            "stream_options": {"include_usage": True}})  # fmt: skip
    events, done = parse_sse(response.text)
    assert done
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for event in events:
        for choice in event["choices"]:
            by_index[choice["index"]].append(choice)
    texts = sorted("".join(c["delta"].get("content", "") for c in chunks)
                   for chunks in by_index.values())  # fmt: skip
    assert texts == ["ab", "cd"]
    for chunks in by_index.values():
        assert chunks[0]["delta"] == {"role": "assistant"}
        assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


async def test_too_many_choices_and_engines_that_cannot_are_400(
    served: tuple[httpx.AsyncClient, UsageLedger, MemoryStore], client: httpx.AsyncClient
) -> None:
    choosing_client, _, _ = served
    for n in (0, 9, "2"):
        response = await choosing_client.post(URL, json={**BODY, "n": n})
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    # The conftest backend, like an upstream engine, serves one choice.
    refused = await client.post(URL, json={**BODY, "n": 2})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n" and "n=1" in refused.json()["error"]["message"]
    assert (await client.post(URL, json={**BODY, "n": 1})).status_code == 200


async def test_a_failing_choice_fails_the_request_and_frees_the_others(
    served: tuple[httpx.AsyncClient, UsageLedger, MemoryStore], choosing: ScriptedBackend
) -> None:
    client, ledger, store = served
    choosing.enqueue(["x"] * 50, delay_s=0.01)
    choosing.enqueue(["y"], fail_with=EngineError("boom"))
    response = await client.post(URL, json={**BODY, "n": 2})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "engine_error"
    await ledger.flush()
    assert [r.status for r in store.records] == [500]
    assert choosing.closed_streams == 2  # the healthy choice was stopped too
