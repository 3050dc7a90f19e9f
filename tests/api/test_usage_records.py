"""One usage record per request, agreeing with the response's `usage`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from mimoserve.app import create_app
from mimoserve.auth.keys import KeyStore, Principal
from mimoserve.chat.service import ChatService
from mimoserve.config import Settings
from mimoserve.errors import EngineError
from mimoserve.events import ContentDelta
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import ModelRegistry
from tests.api.sse_client import stream_events
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"
BODY = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}


class MemoryStore:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def insert_usage(self, records: Sequence[UsageRecord]) -> None:
        self.records.extend(records)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def metered(
    settings: Settings, keys: KeyStore, backend: ScriptedBackend, api_key: str, store: MemoryStore
) -> AsyncIterator[tuple[httpx.AsyncClient, UsageLedger]]:
    registry = ModelRegistry.from_toml(REGISTRY)
    ledger = UsageLedger(store, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, keys=keys, ledger=ledger,
                     backends={e.id: backend for e in registry.entries()})  # fmt: skip
    ledger.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"api-key": api_key}) as client:  # fmt: skip
        yield client, ledger


async def test_usage_in_responses_and_ledger_agree(
    metered: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend,
    store: MemoryStore, api_key: str,
) -> None:  # fmt: skip
    client, ledger = metered
    backend.enqueue(["a", "b"], prompt_tokens=12, cached_tokens=5)
    usage = (await client.post(URL, json=BODY)).json()["usage"]
    backend.enqueue(["c"], prompt_tokens=3)
    _, events, _ = await stream_events(client, {**BODY, "stream_options": {"include_usage": True}})
    await ledger.close()
    first, second = store.records
    key_id = api_key[5:17]
    assert (first.key_id, first.model, first.status, first.finish_reason) == (
        key_id,
        "mimo-v2-flash",
        200,
        "stop",
    )
    assert (first.prompt_tokens, first.completion_tokens, first.cached_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )
    assert second.completion_tokens == events[-1]["usage"]["completion_tokens"] == 1
    assert first.latency_s >= 0 and first.ttft_s is not None


async def test_failed_and_refused_requests_are_recorded(
    metered: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend, store: MemoryStore
) -> None:
    client, ledger = metered
    backend.enqueue(["x", "y"], prompt_tokens=9, fail_with=EngineError("boom"))
    await stream_events(client, BODY)
    await client.post(URL, json={**BODY, "tool_choice": "required"})
    await ledger.close()
    failed, refused = store.records
    assert (failed.status, failed.prompt_tokens, failed.completion_tokens) == (500, 9, 2)
    assert (refused.status, refused.model, refused.completion_tokens) == (400, "mimo-v2-flash", 0)


async def test_abandoned_generation_is_recorded_with_what_it_consumed(
    backend: ScriptedBackend, store: MemoryStore
) -> None:
    registry = ModelRegistry.from_toml(REGISTRY)
    ledger = UsageLedger(store)
    service = ChatService(registry, {e.id: backend for e in registry.entries()}, ledger=ledger)
    backend.enqueue(["one", "two", "three", "four"], prompt_tokens=30)
    request = ChatCompletionRequest.model_validate({**BODY, "stream": True})
    chat = service.prepare(request, Principal(key_id="key1", key_name="k"))
    events = await service.open_choices(chat)
    received = [await anext(events) for _ in range(5)]  # started, progress, one, progress, two
    assert received[-1] == (0, ContentDelta("two"))
    await events.aclose()  # the client went away
    await ledger.close()
    [record] = store.records
    assert (record.status, record.prompt_tokens, record.key_id) == (499, 30, "key1")
    assert 2 <= record.completion_tokens <= 3


async def test_the_record_keeps_speculation_counts(
    metered: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend, store: MemoryStore
) -> None:
    from mimoserve.events import Finished, Started, TokenUsage

    async def generate(request: object) -> AsyncIterator[object]:
        yield Started(prompt_tokens=4)
        yield Finished("stop", TokenUsage(4, 30, draft_tokens=40, accepted_draft_tokens=25))

    backend.generate = generate  # type: ignore[method-assign,assignment]
    client, ledger = metered
    assert (await client.post(URL, json=BODY)).status_code == 200
    await ledger.close()
    [record] = store.records
    assert (record.draft_tokens, record.accepted_draft_tokens) == (40, 25)
