"""The OpenAI Responses door through the official `openai` SDK and raw SSE (fake
backend): responses, streams in Responses' event order, function calls, a two-turn tool
loop, Codex's tool shapes, stateless refusals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from mimoserve.backends.base import GenerationRequest
from mimoserve.config import Settings
from mimoserve.store.base import Database
from tests.fake_backend import ScriptedBackend, fake_app
from tests.services import uvicorn_in_thread

WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}  # fmt: skip
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


@pytest.fixture
async def sdk(
    settings: Settings, database: Database, backend: ScriptedBackend, api_key: str
) -> AsyncIterator[openai.AsyncOpenAI]:
    with uvicorn_in_thread(fake_app(settings, database, backend)) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as sdk:
            yield sdk


async def test_create_a_response(sdk: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    backend.enqueue(["Hi ", "there."], prompt_tokens=9)
    response = await sdk.responses.create(model="mimo-v2-flash", input="Hello",
                                          instructions="Be brief.", max_output_tokens=50)  # fmt: skip
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hi there."
    assert response.usage is not None and response.usage.input_tokens == 9
    assert response.usage.output_tokens == 2
    sent: GenerationRequest = backend.requests[-1]
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", "Hello"),
    ]
    assert sent.sampling.max_tokens == 50


async def test_a_cut_answer_is_incomplete(
    sdk: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Hi"], reason="length")
    response = await sdk.responses.create(
        model="mimo-v2-flash", input="Hello", max_output_tokens=16
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


async def test_stream_events_in_order(sdk: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    backend.enqueue(["Thinking.", "</think>", "Four."])
    stream = await sdk.responses.create(model="mimo-v2-pro", input="2+2?", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert (
        kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert (reasoning, text) == ("Thinking.", "Four.")
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == ["reasoning", "message"]


async def test_a_two_turn_tool_loop(sdk: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    backend.enqueue([CALL])
    first = await sdk.responses.create(model="mimo-v2-flash", input="Weather in Oslo?",
                                       tools=[WEATHER])  # fmt: skip
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    backend.enqueue(["Sunny."])
    history: Any = [{"role": "user", "content": "Weather in Oslo?"}, call.model_dump(),
                    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]  # fmt: skip
    second = await sdk.responses.create(model="mimo-v2-flash", input=history, tools=[WEATHER])
    assert second.output_text == "Sunny."
    sent: GenerationRequest = backend.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[2].tool_call_id == call.call_id


async def test_streamed_function_call_arguments(
    sdk: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    backend.enqueue([CALL[i : i + 6] for i in range(0, len(CALL), 6)])
    stream = await sdk.responses.create(model="mimo-v2-flash", input="Weather?", tools=[WEATHER],
                                        stream=True)  # fmt: skip
    events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and json.loads("".join(deltas)) == {"city": "Oslo"}
    [done] = [e for e in events if e.type == "response.output_item.done"]
    assert done.item.type == "function_call" and done.item.name == "get_weather"


async def test_codex_tools_do_not_fail_the_request(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    body = json.loads((FIXTURES / "codex_tool_shapes.json").read_text())
    backend.enqueue(
        [
            '<tool_call>{"name": "apply_patch", "arguments": {"input": "*** Begin Patch"}}</tool_call>'
        ]
    )
    response = await client.post("/v1/responses", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    [call] = [item for item in response.json()["output"] if item["type"] != "message"]
    assert call == {
        **call,
        "type": "custom_tool_call",
        "name": "apply_patch",
        "input": "*** Begin Patch",
    }
    sent: GenerationRequest = backend.requests[-1]
    names = [t["function"]["name"] for t in sent.tools]
    assert names == ["shell", "apply_patch", "list_mcp_resources"]  # web_search dropped
    assert [m.role for m in sent.messages][:2] == ["system", "system"]  # two developer messages


async def test_what_codex_sends_is_accepted(
    client: httpx.AsyncClient, backend: ScriptedBackend, settings: Settings
) -> None:
    """The first request Codex 0.171 sent to this server (recorded by
    tests/e2e/test_agent_clis.py's run): two developer messages, a namespace tool,
    web_search, reasoning summary auto, store false, encrypted reasoning included."""
    settings.max_body_bytes = 1 << 20
    body = json.loads((FIXTURES / "codex_request.json").read_text())
    backend.enqueue(["Hello."])
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("event: ")]
    assert lines[0] == "event: response.created" and lines[-1] == "event: response.completed"
    sent: GenerationRequest = backend.requests[-1]
    assert "exec_command" in [t["function"]["name"] for t in sent.tools]
    assert [m.role for m in sent.messages][:2] == ["system", "system"]


async def test_previous_response_id_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/responses", json={
        "model": "mimo-v2-flash", "input": "hi", "previous_response_id": "resp_1"})  # fmt: skip
    assert response.status_code == 400
    assert "stateless" in response.json()["error"]["message"]


async def test_effort_none_switches_thinking_off(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post("/v1/responses", json={"model": "mimo-v2-pro", "input": "hi",
                                             "reasoning": {"effort": "none"}})  # fmt: skip
    assert backend.requests[-1].thinking.mode == "off"


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
