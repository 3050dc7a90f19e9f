"""The Anthropic Messages door through the official `anthropic` SDK and raw HTTP
(fake backend): messages, streams in Anthropic's exact event order, tools, thinking,
count_tokens, errors in Anthropic's shape, and what Claude Code sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest

from mimoserve.backends.base import GenerationRequest
from mimoserve.config import Settings
from mimoserve.store.base import Database
from tests.fake_backend import ScriptedBackend, fake_app
from tests.services import uvicorn_in_thread

WEATHER_TOOL: Any = {"name": "get_weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}  # fmt: skip
HELLO: Any = [{"role": "user", "content": "Hello"}]


@pytest.fixture
async def sdk(
    settings: Settings, database: Database, backend: ScriptedBackend, api_key: str
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # The SDK brings its own HTTP client: it talks to a real server on 127.0.0.1.
    with uvicorn_in_thread(fake_app(settings, database, backend)) as url:
        async with anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=api_key,
                                            max_retries=0) as sdk:  # fmt: skip
            yield sdk


async def test_create_a_message(sdk: anthropic.AsyncAnthropic, backend: ScriptedBackend) -> None:
    backend.enqueue(["Hi ", "there."], prompt_tokens=12)
    message = await sdk.messages.create(model="mimo-v2-flash", max_tokens=64, messages=HELLO)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == "mimo-v2-flash"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hi there.")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 2
    assert backend.requests[-1].sampling.max_tokens == 64


async def test_stream_and_final_message(
    sdk: anthropic.AsyncAnthropic, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Hi ", "there."])
    async with sdk.messages.stream(model="mimo-v2-flash", max_tokens=64, messages=HELLO) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Hi there."
    assert final.content[0].type == "text" and final.stop_reason == "end_turn"


async def test_tool_use_round_trip(sdk: anthropic.AsyncAnthropic, backend: ScriptedBackend) -> None:
    backend.enqueue(
        ['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']
    )
    message = await sdk.messages.create(
        model="mimo-v2-flash",
        max_tokens=64,
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
    )
    assert message.stop_reason == "tool_use"
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert (
        use.name == "get_weather" and use.input == {"city": "Oslo"} and use.id.startswith("toolu_")
    )
    backend.enqueue(["It is sunny."])
    history: list[Any] = [*HELLO, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "sunny, 20C"}]}]  # fmt: skip
    answer = await sdk.messages.create(
        model="mimo-v2-flash", max_tokens=64, messages=history, tools=[WEATHER_TOOL]
    )
    assert answer.content[0].text == "It is sunny."  # type: ignore[union-attr]
    sent: GenerationRequest = backend.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].tool_calls[0]["function"]["name"] == "get_weather"
    assert sent.messages[2].tool_call_id == use.id and sent.messages[2].content == "sunny, 20C"


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "any"}, "required"), ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ({"type": "none"}, None), ({"type": "auto"}, None),
])  # fmt: skip
async def test_tool_choice_is_mapped_exactly(
    client: httpx.AsyncClient,
    backend: ScriptedBackend,
    choice: dict[str, Any],
    expected: str | None,
) -> None:
    backend.enqueue(['{"city": "Oslo"}' if expected == "get_weather" else
                     '{"name": "get_weather", "arguments": {"city": "Oslo"}}' if expected else "ok"])  # fmt: skip
    body = {"model": "mimo-v2-flash", "max_tokens": 32, "messages": HELLO, "tools": [WEATHER_TOOL],
            "tool_choice": choice}  # fmt: skip
    data = (await client.post("/v1/messages?beta=true", json=body)).json()
    plan = backend.requests[-1].plan
    assert (plan.forced_name or ("required" if plan.forced_any else None)) == expected
    if expected:
        assert data["stop_reason"] == "tool_use"
    if choice["type"] == "none":
        assert backend.requests[-1].tools == ()


async def test_thinking_is_streamed_as_a_thinking_block_with_a_signature(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Let me see.", "</think>", "Four."])
    body = {"model": "mimo-v2-pro", "max_tokens": 64, "messages": HELLO, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    events = await sse_events(client, body)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == [
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == 7
    blocks = [e for e in events if e["type"] == "content_block_start"]
    assert [b["content_block"] for b in blocks] == [{"type": "thinking", "thinking": ""},
                                                    {"type": "text", "text": ""}]  # fmt: skip
    assert [b["index"] for b in blocks] == [0, 1]
    # The thinking block ends with its signature, and closes before the text opens.
    order = [(e["type"], e.get("delta", {}).get("type")) for e in events]
    close = order.index(("content_block_stop", None))
    assert order[close - 1] == ("content_block_delta", "signature_delta")
    assert order.index(("content_block_start", None), close) > close
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == "Let me see."
    assert "".join(d.get("text", "") for d in deltas) == "Four."
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert backend.requests[-1].thinking.budget == 1024


async def sse_events(client: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = await client.post("/v1/messages", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events, name = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            events.append(data)
    return events


async def test_streamed_tool_use_sends_input_json_deltas(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    backend.enqueue([text[i : i + 7] for i in range(0, len(text), 7)])
    body = {"model": "mimo-v2-flash", "max_tokens": 64, "messages": HELLO, "stream": True,
            "tools": [WEATHER_TOOL]}  # fmt: skip
    events = await sse_events(client, body)
    [start] = [e for e in events if e["type"] == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta")  # fmt: skip
    assert json.loads(partial) == {"city": "Oslo"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


async def test_what_claude_code_sends_is_accepted(
    client: httpx.AsyncClient, backend: ScriptedBackend, settings: Settings
) -> None:
    """The first request Claude Code 2.1 sent to this server (recorded by
    tests/e2e/test_agent_clis.py's run): streamed, about 76 KB, 24 tools."""
    settings.max_body_bytes = 1 << 20
    body = json.loads((FIXTURES / "claude_code_request.json").read_text())
    backend.enqueue(["Done."])
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,made-up-beta",
    }
    response = await client.post("/v1/messages?beta=true", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    sent: GenerationRequest = backend.requests[-1]
    system = sent.messages[0]
    assert system.role == "system" and "billing-header" not in (system.content or "")
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
    assert "Write" in [t["function"]["name"] for t in sent.tools]
    assert any(m.role == "system" for m in sent.messages[1:])  # the system turn after the user's


async def test_count_tokens(client: httpx.AsyncClient) -> None:
    body = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "one two three"}]}
    data = (await client.post("/anthropic/v1/messages/count_tokens", json=body)).json()
    assert data == {"input_tokens": 7}


@pytest.mark.parametrize(("headers", "body", "status", "kind"), [
    ({"api-key": "", "x-api-key": "nope"}, {"model": "mimo-v2-flash", "max_tokens": 5, "messages": HELLO}, 401, "authentication_error"),
    ({}, {"model": "mimo-v2-flash", "messages": HELLO}, 400, "invalid_request_error"),
    ({}, {"model": "no-such-model", "max_tokens": 5, "messages": HELLO}, 404, "not_found_error"),
    ({}, {"model": "mimo-v2-flash", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     400, "invalid_request_error"),
])  # fmt: skip
async def test_errors_use_anthropics_shape(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any], status: int, kind: str
) -> None:
    response = await client.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == status
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] == kind and data["error"]["message"]


async def test_the_sdk_reads_errors(sdk: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.create(model="nope", max_tokens=5, messages=HELLO)


async def test_a_prompt_over_the_context_says_prompt_is_too_long(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    from mimoserve.errors import ContextLengthExceededError

    backend.enqueue([], refuse_with=ContextLengthExceededError(
        "too long", prompt_tokens=11_600, limit=4096, param="messages"))  # fmt: skip
    body = {"model": "mimo-v2-flash", "max_tokens": 5, "messages": HELLO}
    response = await client.post("/v1/messages", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("prompt is too long: 11600 tokens > 4096")


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(("model", "thinking", "effort", "mode"), [
    ("mimo-v2-flash", {"type": "adaptive"}, None, "off"),  # the model's default: off for flash
    ("mimo-v2-pro", {"type": "adaptive"}, "medium", "prompted"),  # ... on for pro
    ("mimo-v2-pro", {"type": "adaptive"}, "low", "off"),
    ("mimo-v2-flash", {"type": "adaptive"}, "high", "prompted"),
    ("mimo-v2-flash", {"type": "enabled", "budget_tokens": 2048}, None, "prompted"),
    ("mimo-v2-pro", {"type": "disabled"}, None, "off"),
    ("mimo-v2-flash", None, "max", "prompted"),
])  # fmt: skip
async def test_thinking_and_effort_map_to_the_mimo_switch(
    client: httpx.AsyncClient, backend: ScriptedBackend, model: str,
    thinking: dict[str, Any] | None, effort: str | None, mode: str,
) -> None:  # fmt: skip
    body: dict[str, Any] = {"model": model, "max_tokens": 8, "messages": HELLO}
    if thinking is not None:
        body["thinking"] = thinking
    if effort is not None:
        body["output_config"] = {"effort": effort}
    assert (await client.post("/v1/messages", json=body)).status_code == 200
    assert backend.requests[-1].thinking.mode == mode
