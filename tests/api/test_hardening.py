"""The inputs that used to crash or 500 the server, each answered as the contract says."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

from mimoserve.api.openai_chat import to_chunks
from mimoserve.api.sse import EventStreamResponse, sse_frames
from mimoserve.auth.keys import KeyStore
from mimoserve.chat.service import ChatService
from mimoserve.limits.limiter import RateLimiter
from mimoserve.limits.policy import Limits
from mimoserve.metering.ledger import UsageLedger
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.registry import ModelRegistry
from mimoserve.streams import OwnedStream
from tests.api.test_usage_records import BODY, URL, MemoryStore
from tests.api.test_validation import assert_error
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend


async def test_a_body_nested_5000_arrays_deep_is_a_400(client: httpx.AsyncClient) -> None:
    raw = '{"model":"mimo-v2-flash","messages":' + "[" * 5000 + "]" * 5000 + "}"
    response = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)


async def test_null_means_not_given_for_every_optional_field(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    nulls = {name: None for name, field in ChatCompletionRequest.model_fields.items()
             if not field.is_required()}  # fmt: skip
    assert "stream" in nulls and "stream_options" in nulls
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": None, "tool_calls": None, "reasoning_content": None},
        {"role": "user", "content": "again"},
    ]
    response = await client.post(URL, json={**BODY, "messages": messages, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ok"


async def test_null_for_a_required_field_is_still_refused(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(URL, json={**BODY, "model": None}), 400, "model")


async def test_assistant_turns_with_null_content_are_accepted(client: httpx.AsyncClient) -> None:
    calls: list[Any] | None
    for calls in (None, []):
        messages = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "user", "content": "b"},
        ]
        response = await client.post(URL, json={**BODY, "messages": messages})
        assert response.status_code == 200, response.text


async def test_stop_strings_have_a_length_cap(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(URL, json={**BODY, "stop": "x" * 257}), 400, "stop")
    assert_error(await client.post(URL, json={**BODY, "stop": ["ok", "x" * 257]}), 400)
    response = await client.post(URL, json={**BODY, "stop": ["x" * 256]})
    assert response.status_code == 200


async def test_an_unexpected_engine_exception_is_recorded_as_500_not_499(
    settings: Any, keys: KeyStore, backend: ScriptedBackend, api_key: str
) -> None:
    from mimoserve.app import create_app

    store = MemoryStore()
    registry = ModelRegistry.from_toml(REGISTRY)
    ledger = UsageLedger(store, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, keys=keys, ledger=ledger,
                     backends={e.id: backend for e in registry.entries()})  # fmt: skip
    backend.enqueue(["a"], fail_with=RuntimeError("a bug"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://t", headers={"api-key": api_key}) as client:  # fmt: skip
        response = await client.post(URL, json=BODY)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    await ledger.flush()
    assert [r.status for r in store.records] == [500]


async def test_a_stream_dropped_before_its_first_byte_releases_its_slot(
    keys: KeyStore, backend: ScriptedBackend
) -> None:
    """The client leaves the moment its stream opens: the response's first `send` fails.
    Its concurrency slot (one per key here) and the engine stream must come back."""
    registry = ModelRegistry.from_toml(REGISTRY)
    store = MemoryStore()
    ledger = UsageLedger(store)
    service = ChatService(registry, {e.id: backend for e in registry.entries()},
                          ledger=ledger, limiter=RateLimiter())  # fmt: skip
    issued = keys.create("one-at-a-time", limits=Limits(max_concurrent=1))
    principal = keys.authenticate(issued.secret)
    assert principal is not None
    request = ChatCompletionRequest.model_validate({**BODY, "stream": True})

    async def gone(message: object) -> None:
        raise OSError("the client closed the connection")

    async def never_disconnects() -> dict[str, str]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    for _ in range(3):  # with a leak, the second stream is refused (429)
        backend.enqueue(["a", "b"])
        chat = service.prepare(request, principal)
        events = await service.open_choices(chat)
        response = EventStreamResponse(
            sse_frames(OwnedStream(to_chunks(chat, events), events.aclose))
        )
        with contextlib.suppress(OSError):
            await response({"type": "http"}, never_disconnects, gone)
    assert backend.closed_streams == 3
    await ledger.flush()
    assert [r.status for r in store.records] == [499, 499, 499]


def test_a_fence_followed_by_whitespace_parses_in_linear_time() -> None:
    from mimoserve.parsing.bare_json import parse_bare_calls

    tools = {"f": {"type": "object"}}
    start = time.perf_counter()
    for text in (
        "```" + " " * 20_000,
        "```json" + "\n" * 20_000 + "x```",
        "```" + " " * 20_000 + "```",
    ):
        assert parse_bare_calls(text, tools) is None
    # The backtracking pattern took 17 s for 4,000 spaces; linear parsing takes microseconds.
    assert time.perf_counter() - start < 2
    fenced = '```json\n{"name": "f", "arguments": {"a": 1}}\n```'
    calls = parse_bare_calls(fenced, tools)
    assert calls is not None and calls[0].name == "f"


async def test_door_items_of_the_wrong_shape_are_400s(client: httpx.AsyncClient) -> None:
    image = {"type": "image", "source": ["not", "an", "object"]}
    body = {
        "model": "mimo-v2-flash",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [image]}],
    }
    response = await client.post("/v1/messages", json=body)
    assert (
        response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    )
    items = [{"type": "reasoning", "content": 5}, {"role": "user", "content": "hi"}]
    response = await client.post("/v1/responses", json={"model": "mimo-v2-flash", "input": items})
    assert response.status_code == 200, response.text
