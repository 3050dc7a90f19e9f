"""One event stream for every backend: however the engine's output is split, the events
reassemble to the same answer, for a text engine (the embedded one's parsers) and for an
upstream engine's structured deltas alike. And a forced call streams from its start."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from mimoserve.app import create_app
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.structured import StructuredOutput
from mimoserve.backends.upstream.events import AnswerMapper
from mimoserve.config import Settings
from mimoserve.events import (
    ContentDelta,
    Finished,
    GenerationEvent,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallEnded,
    ToolCallStarted,
)
from mimoserve.parsing.assembler import OutputPlan
from mimoserve.parsing.output import OutputFormat
from mimoserve.registry import ModelRegistry
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend
from tests.services import uvicorn_in_thread

TOOLS: dict[str, Any] = {"get_weather": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}, "search": {"type": "object"}}  # fmt: skip
HERMES = OutputPlan(OutputFormat(think=True, start_in_think=True, tool_format="hermes"), TOOLS)
MIMO = OutputPlan(OutputFormat(think=True, tool_format="mimo_xml"), TOOLS)
REASONING, CONTENT = "I need the weather, then a search.", "Here you go."
CALLS = [("get_weather", {"city": "Oslo", "days": 3}), ("search", {"q": "北京 <x>"})]
HERMES_TEXT = (
    f"{REASONING}</think>\n\n{CONTENT}"
    + "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a, ensure_ascii=False)}}}\n</tool_call>'
              for n, a in CALLS)
)  # fmt: skip
MIMO_TEXT = (
    f"<think>{REASONING}</think>{CONTENT}"
    "<tool_call><function=get_weather><parameter=city>Oslo</parameter>"
    "<parameter=days>3</parameter></function></tool_call>"
    '<tool_call><function=search><parameter=q>北京 <x></parameter></function></tool_call>'
)  # fmt: skip
EXPECTED = {"reasoning": REASONING, "content": CONTENT, "calls": CALLS, "ended": [0, 1]}


def reassembled(events: list[GenerationEvent]) -> dict[str, Any]:
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStarted)]
    assert [s.index for s in starts] == list(range(len(starts)))
    arguments = ["".join(e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == s.index)
                 for s in starts]  # fmt: skip
    return {"reasoning": reasoning.strip(), "content": content.strip(),
            "calls": [(s.name, json.loads(a)) for s, a in zip(starts, arguments, strict=True)],
            "ended": [e.index for e in events if isinstance(e, ToolCallEnded)]}  # fmt: skip


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def text_engine(plan: OutputPlan, pieces: list[str]) -> list[GenerationEvent]:
    output = StructuredOutput(plan)
    events: list[GenerationEvent] = []
    for piece in pieces:
        events += output.feed(piece)
    return events + output.finish()


def upstream_chunks(cuts: list[int]) -> list[dict[str, Any]]:
    """The same answer as an engine with its own parsers streams it: structured deltas,
    each field cut where `cuts` says."""
    chunks: list[dict[str, Any]] = [{"choices": [{"delta": {"role": "assistant"}}]}]
    for piece in pieces_of(REASONING, cuts):
        chunks.append({"choices": [{"delta": {"reasoning": piece}}]})
    for piece in pieces_of(CONTENT, cuts):
        chunks.append({"choices": [{"delta": {"content": piece}}]})
    for index, (name, arguments) in enumerate(CALLS):
        chunks.append({"choices": [{"delta": {"tool_calls": [
            {"index": index, "id": f"engine_{index}", "type": "function", "function": {"name": name}}]}}]})  # fmt: skip
        for piece in pieces_of(json.dumps(arguments, ensure_ascii=False), cuts):
            chunks.append({"choices": [{"delta": {"tool_calls": [
                {"index": index, "function": {"arguments": piece}}]}}]})  # fmt: skip
    chunks.append({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
    return chunks


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_every_split_gives_the_same_answer_on_every_backend(cuts: list[int]) -> None:
    assert reassembled(text_engine(HERMES, pieces_of(HERMES_TEXT, cuts))) == EXPECTED
    assert reassembled(text_engine(MIMO, pieces_of(MIMO_TEXT, cuts))) == EXPECTED
    mapper = AnswerMapper(lambda: 0)
    events = [e for chunk in upstream_chunks(cuts) for e in mapper.chunk(chunk)] + mapper.finish()
    assert reassembled(events) == EXPECTED
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "stop"
    assert finished.usage.completion_tokens == 9


def test_hermes_calls_stream_their_arguments_before_the_call_closes() -> None:
    output = StructuredOutput(HERMES)
    output.feed(f"{REASONING}</think>")
    events = output.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Os')
    assert isinstance(events[0], ToolCallStarted) and events[0].name == "get_weather"
    assert events[1:] == [ToolCallDelta(0, '{"city": "Os')]


def test_a_forced_call_stream_starts_before_generation_ends(
    tmp_path: Path, keys: KeyStore, api_key: str
) -> None:
    """Headers, the role chunk and the call's id, name and first arguments arrive while the
    engine is still generating (they used to wait for the whole call)."""
    backend = ScriptedBackend()
    registry = ModelRegistry.from_toml(REGISTRY)
    app = create_app(Settings(home=tmp_path), registry=registry, keys=keys,
                     backends={e.id: backend for e in registry.entries()})  # fmt: skip
    pieces = ['{"city": ', '"Oslo"', ', "days"', ": 3}"]
    # The engine writes the first piece, then waits until the test has seen what it must
    # see before generation goes on: if the server held the stream back, it would never
    # come (and the read would time out).
    script = backend.enqueue(pieces, hold_after=1)
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": TOOLS["get_weather"]},
    }
    body = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "weather?"}],
            "tools": [tool], "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    calls: list[dict[str, Any]] = []
    seen_while_generating: list[dict[str, Any]] = []
    with uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body,
                        headers={"api-key": api_key}) as response:  # fmt: skip
        assert response.status_code == 200  # headers, with the engine mid-answer
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and "tool_calls" in chunk["choices"][0]["delta"]:
                calls.append(chunk["choices"][0]["delta"]["tool_calls"][0])
            if not script.release.is_set() and len(calls) == 2:
                seen_while_generating = list(calls)
                script.release.set()  # now let the engine finish
    first, second = seen_while_generating
    assert first["function"]["name"] == "get_weather"
    assert second["function"]["arguments"] == '{"city": '
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    assert json.loads(arguments) == {"city": "Oslo", "days": 3}
