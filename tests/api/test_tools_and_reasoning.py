"""Reasoning, tool calls and constrained output through the API (scripted backend)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from mimoserve.backends.base import Capabilities
from tests.api.sse_client import stream_events
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


def payload(**fields: Any) -> dict[str, Any]:
    base = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    return {**base, **fields}


def reassemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client rebuilds from a stream: texts joined, tool-call pieces joined per index."""
    reasoning, content = "", ""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            assert not ("content" in delta and "reasoning_content" in delta), "separate chunks"
            reasoning += delta.get("reasoning_content", "")
            content += delta.get("content", "")
            for piece in delta.get("tool_calls", []):
                call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
                if "id" in piece:
                    assert call["name"] == "", "id, type and name come first"
                    call.update(id=piece["id"], type=piece["type"])
                call["name"] += piece.get("function", {}).get("name", "")
                call["arguments"] += piece.get("function", {}).get("arguments", "")
    return {"reasoning": reasoning, "content": content, "calls": [calls[i] for i in sorted(calls)]}


async def test_reasoning_is_split_from_content(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["<think>", "Oslo is ", "cold.</th", "ink>\n\nIt", " is cold."])
    message = (await client.post(URL, json=payload())).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Oslo is cold."
    assert message["content"] == "It is cold."


async def test_reasoning_streams_first_in_its_own_chunks(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["<think>a", "b</think>", "c", "d"])
    _, events, done = await stream_events(client, payload())
    assert done
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    kinds = [next(iter(d)) for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")
    assert reassemble(events)["reasoning"] == "ab" and reassemble(events)["content"] == "cd"


async def test_hermes_tool_calls_become_tool_calls(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": {"q": "snow"}}\n</tool_call>')  # fmt: skip
    backend.enqueue([text[i : i + 3] for i in range(0, len(text), 3)])
    data = (await client.post(URL, json=payload(tools=[WEATHER, SEARCH]))).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)


async def test_streamed_tool_calls_reassemble_to_the_non_streamed_answer(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    text = ('<think>need weather</think><tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Oslo"}}</tool_call><tool_call>{"name": "search", "arguments": {}}</tool_call>')  # fmt: skip
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    backend.enqueue(pieces)
    backend.enqueue(pieces)
    whole = (await client.post(URL, json=payload(tools=[WEATHER, SEARCH]))).json()["choices"][0]
    _, events, done = await stream_events(client, payload(tools=[WEATHER, SEARCH]))
    rebuilt = reassemble(events)
    assert done and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert rebuilt["reasoning"] == whole["message"]["reasoning_content"]
    assert [(c["name"], c["arguments"]) for c in rebuilt["calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    # Arguments stream as they are written: the id and name first, then pieces, call by call.
    deltas = [e["choices"][0]["delta"]["tool_calls"][0]
              for e in events if e["choices"] and "tool_calls" in e["choices"][0]["delta"]]  # fmt: skip
    indices = [d["index"] for d in deltas]
    assert indices == sorted(indices) and set(indices) == {0, 1}
    firsts = [d for i, d in enumerate(deltas) if i == 0 or deltas[i - 1]["index"] != d["index"]]
    assert all(d["id"].startswith("call_") and d["function"]["name"] for d in firsts)
    assert len(deltas) > 4, "the weather call's arguments came in several pieces"


async def test_a_call_left_malformed_still_has_arguments_that_parse(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    # Its head named a declared tool, so it was streaming: what the model left open is
    # closed, and the concatenated arguments parse.
    backend.enqueue(['<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'])
    choice = (await client.post(URL, json=payload(tools=[WEATHER]))).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": None}


async def test_a_body_that_is_not_a_streamable_call_is_returned_as_content(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(['<tool_call>{"arguments": {"city": </tool_call>'])
    choice = (await client.post(URL, json=payload(tools=[WEATHER]))).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].startswith("<tool_call>{")
    assert "tool_calls" not in choice["message"]


async def test_bare_json_call_is_recognised_where_the_registry_says(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    answer = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    backend.enqueue([answer])
    backend.enqueue([answer])
    body = payload(model="mimo-v2-pro", tools=[WEATHER], thinking={"type": "disabled"})
    pro = (await client.post(URL, json=body)).json()
    assert pro["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    flash = (await client.post(URL, json=payload(tools=[WEATHER]))).json()
    assert flash["choices"][0]["message"]["content"] == answer


async def test_mimo_xml_calls_convert_parameters_by_schema(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    tool = {"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}  # fmt: skip
    backend.enqueue(["<tool_call>\n<function=forecast>\n<parameter=city>\nOslo\n</parameter>\n"
                     "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"])  # fmt: skip
    data = (await client.post(URL, json=payload(model="mimo-xml", tools=[tool]))).json()
    call = data["choices"][0]["message"]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"]) == {"city": "Oslo", "days": 3}


async def test_named_tool_choice_constrains_to_the_tool_schema(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(['{"city": ', '"Oslo"}'])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    data = (
        await client.post(URL, json=payload(tools=[WEATHER, SEARCH], tool_choice=choice))
    ).json()
    request = backend.requests[-1]
    assert request.constraint is not None and request.constraint.source == "tools"
    assert request.constraint.schema == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert request.thinking.mode == "off"
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "get_weather",
        {"city": "Oslo"},
    )
    assert data["choices"][0]["finish_reason"] == "tool_calls"


async def test_required_tool_choice_constrains_to_any_declared_call(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(['{"name": "search", "arguments": {"q": "x"}}'])
    data = (
        await client.post(URL, json=payload(tools=[WEATHER, SEARCH], tool_choice="required"))
    ).json()
    schema = backend.requests[-1].constraint.schema  # type: ignore[union-attr]
    assert schema is not None
    assert [e["properties"]["name"]["const"] for e in schema["anyOf"]] == ["get_weather", "search"]
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "search"


async def test_forced_call_cut_short_ends_with_length_and_arguments_that_parse(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(['{"city": "Os'], reason="length")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    data = (await client.post(URL, json=payload(tools=[WEATHER], tool_choice=choice))).json()
    assert data["choices"][0]["finish_reason"] == "length"
    [call] = data["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Os"}


async def test_tool_choice_none_sends_no_tools_and_parses_none(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(['<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'])
    data = (await client.post(URL, json=payload(tools=[WEATHER], tool_choice="none"))).json()
    assert backend.requests[-1].tools == ()
    assert data["choices"][0]["message"]["content"].startswith("<tool_call>")


@pytest.mark.parametrize(
    ("model", "thinking", "expected"),
    [("mimo-v2-flash", None, "off"), ("mimo-v2-pro", None, "prompted"),
     ("mimo-v2-pro", {"type": "disabled"}, "off"), ("mimo-v2-flash", {"type": "enabled"}, "prompted"),
     ("mimo-xml", {"type": "enabled"}, "native")],
)  # fmt: skip
async def test_thinking_defaults_and_switch(
    client: httpx.AsyncClient, backend: ScriptedBackend, model: str, thinking: Any, expected: str
) -> None:
    body = payload(model=model, **({"thinking": thinking} if thinking else {}))
    assert (await client.post(URL, json=body)).status_code == 200
    assert backend.requests[-1].thinking.mode == expected


async def test_prompted_thinking_parses_from_the_opened_block(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["\nThe user wants", " weather.\n</think>\n\nCold."])
    body = payload(thinking={"type": "enabled", "budget_tokens": 64})
    data = (await client.post(URL, json=body)).json()
    assert backend.requests[-1].thinking.budget == 64
    message = data["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants weather.\n"
    assert message["content"] == "Cold."


async def test_reasoning_tokens_are_reported(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    from mimoserve.events import Finished, TokenUsage

    async def generate(request: Any) -> Any:
        yield Finished("stop", TokenUsage(5, 9, 0, reasoning_tokens=6))

    backend.generate = generate  # type: ignore[method-assign]
    usage = (await client.post(URL, json=payload())).json()["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 6


async def test_invalid_tool_parameters_schema_is_400(client: httpx.AsyncClient) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    response = await client.post(URL, json=payload(tools=[bad]))
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


async def test_response_format_needs_a_constraining_backend(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    response = await client.post(URL, json=payload(response_format=fmt))
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    backend.capabilities = Capabilities(context_length=2048, constrained_output=True)
    assert (await client.post(URL, json=payload(response_format=fmt))).status_code == 200
    assert backend.requests[-1].constraint is not None
    assert backend.requests[-1].constraint.schema == {"type": "object"}
