"""The Anthropic and Responses doors' inbound translation, alone: each table row is a
request as a client sends it (the first rows from what Claude Code and Codex really
sent, kept in fixtures/) and what the canonical chat request must say."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mimoserve.api.anthropic_in import BILLING_HEADER
from mimoserve.api.anthropic_in import to_chat_request as from_anthropic
from mimoserve.api.responses_in import to_chat_request as from_responses
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.anthropic import MessagesRequest
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.responses import ResponsesRequest

FIXTURES = Path(__file__).parent / "fixtures"
CLAUDE_CODE = json.loads((FIXTURES / "claude_code_request.json").read_text())
CODEX = json.loads((FIXTURES / "codex_request.json").read_text())
CODEX_TOOLS = json.loads((FIXTURES / "codex_tool_shapes.json").read_text())


def anthropic(body: dict[str, Any]) -> dict[str, Any]:
    request = from_anthropic(MessagesRequest.model_validate(body))
    return request.model_dump(exclude_none=True)


def responses(body: dict[str, Any]) -> dict[str, Any]:
    request = from_responses(ResponsesRequest.model_validate(body)).request
    return request.model_dump(exclude_none=True)


def _system_texts(canonical: dict[str, Any]) -> list[str]:
    return [str(m["content"]) for m in canonical["messages"] if m["role"] == "system"]


MIN = {"model": "mimo-v2-flash", "max_tokens": 64}
USER = {"role": "user", "content": "hi"}

# (name, anthropic body, check of the canonical request)
ANTHROPIC: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], object]]] = [
    ("claude code: the billing header is dropped, the rest of the system kept",
     CLAUDE_CODE,
     lambda c: all(BILLING_HEADER not in s for s in _system_texts(c))
     and any("interactive agent" in s for s in _system_texts(c))),
    ("claude code: its tools become functions with their schemas",
     CLAUDE_CODE,
     lambda c: len(c["tools"]) >= 20
     and all(t["type"] == "function" and "parameters" in t["function"] for t in c["tools"])),
    ("claude code: adaptive thinking at high effort switches MiMo's thinking on",
     CLAUDE_CODE, lambda c: c["thinking"] == {"type": "enabled"}),
    ("adaptive thinking alone follows the model's default",
     {**MIN, "messages": [USER], "thinking": {"type": "adaptive"}}, lambda c: "thinking" not in c),
    ("claude code: max_tokens is the completion cap",
     CLAUDE_CODE, lambda c: c["max_completion_tokens"] == CLAUDE_CODE["max_tokens"]),
    ("a string system prompt", {**MIN, "system": "Be brief.", "messages": [USER]},
     lambda c: c["messages"][0] == {"role": "system", "content": "Be brief."}),
    ("tool_choice any is required", {**MIN, "messages": [USER],
     "tools": [{"name": "f", "input_schema": {"type": "object"}}],
     "tool_choice": {"type": "any"}}, lambda c: c["tool_choice"] == "required"),
    ("tool_choice tool is a named function", {**MIN, "messages": [USER],
     "tools": [{"name": "f", "input_schema": {"type": "object"}}],
     "tool_choice": {"type": "tool", "name": "f"}},
     lambda c: c["tool_choice"] == {"type": "function", "function": {"name": "f"}}),
    ("server tools are dropped", {**MIN, "messages": [USER],
     "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     lambda c: "tools" not in c),
    ("an assistant tool_use becomes a call, its result a tool turn",
     {**MIN, "messages": [
         USER,
         {"role": "assistant", "content": [
             {"type": "thinking", "thinking": "look it up", "signature": "x"},
             {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "t1", "content": "42", "is_error": True}]}]},
     lambda c: c["messages"][1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"q": 1}'}
     and c["messages"][1]["reasoning_content"] == "look it up"
     and c["messages"][2]["role"] == "tool" and c["messages"][2]["tool_call_id"] == "t1"
     and "Error" in str(c["messages"][2]["content"])),
    ("thinking enabled with a budget", {**MIN, "messages": [USER],
     "thinking": {"type": "enabled", "budget_tokens": 1024}},
     lambda c: c["thinking"] == {"type": "enabled", "budget_tokens": 1024}),
    ("low effort switches thinking off", {**MIN, "messages": [USER],
     "output_config": {"effort": "low"}}, lambda c: c["thinking"] == {"type": "disabled"}),
    ("stop sequences and sampling", {**MIN, "messages": [USER], "stop_sequences": ["END"],
     "temperature": 0.2, "top_p": 0.5, "top_k": 7},
     lambda c: c["stop"] == ["END"] and c["temperature"] == 0.2 and c["top_p"] == 0.5
     and c["top_k"] == 7),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "check"), ANTHROPIC, ids=[row[0] for row in ANTHROPIC])
def test_anthropic_requests_translate(
    name: str, body: dict[str, Any], check: Callable[[dict[str, Any]], object]
) -> None:
    assert check(anthropic(body)), name


RESP = {"model": "mimo-v2-flash"}

RESPONSES: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], object]]] = [
    ("codex: developer messages become system turns",
     CODEX, lambda c: any("Codex" in s or "sandbox" in s.lower() for s in _system_texts(c))),
    ("codex: namespace tools are flattened, built-in tools dropped",
     CODEX, lambda c: all(t["type"] == "function" for t in c["tools"])
     and not any(t["function"]["name"] == "web_search" for t in c["tools"])),
    ("codex: reasoning without effort keeps the model's default", CODEX,
     lambda c: "thinking" not in c),
    ("codex tool shapes: custom tools take one string input", CODEX_TOOLS,
     lambda c: any(t["function"]["parameters"].get("properties", {}).get("input") == {"type": "string"}
                   for t in c["tools"])),
    ("text input is one user turn", {**RESP, "input": "hi"},
     lambda c: c["messages"] == [{"role": "user", "content": "hi"}]),
    ("instructions come first", {**RESP, "instructions": "Be brief.", "input": "hi"},
     lambda c: c["messages"][0] == {"role": "system", "content": "Be brief."}),
    ("a function call and its output", {**RESP, "input": [
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "done"}]},
     lambda c: c["messages"][1]["tool_calls"][0]["id"] == "c1"
     and c["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "done"}),
    ("effort none switches thinking off", {**RESP, "input": "hi",
     "reasoning": {"effort": "none"}}, lambda c: c["thinking"] == {"type": "disabled"}),
    ("text.format json_schema is the response format", {**RESP, "input": "hi",
     "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}},
     lambda c: c["response_format"]["type"] == "json_schema"
     and c["response_format"]["json_schema"]["schema_"] == {"type": "object"}),
    ("max_output_tokens is the completion cap", {**RESP, "input": "hi",
     "max_output_tokens": 33}, lambda c: c["max_completion_tokens"] == 33),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "check"), RESPONSES, ids=[row[0] for row in RESPONSES])
def test_responses_requests_translate(
    name: str, body: dict[str, Any], check: Callable[[dict[str, Any]], object]
) -> None:
    assert check(responses(body)), name


@pytest.mark.parametrize(
    ("translate", "body", "param"),
    [
        (anthropic, {**MIN, "messages": [USER], "tool_choice": {"type": "tool"},
                     "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
         "tool_choice.name"),
        (responses, {**RESP, "input": "hi", "previous_response_id": "resp_1"},
         "previous_response_id"),
        (responses, {**RESP, "input": [{"type": "message", "role": "robot", "content": "x"}]},
         "input.0.role"),
        (responses, {**RESP, "input": [{"type": "function_call_output", "output": "x"}]},
         "input.0.call_id"),
    ],
)  # fmt: skip
def test_what_cannot_be_translated_is_a_400_naming_the_field(
    translate: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        translate(body)
    assert refused.value.param == param


def test_the_canonical_request_is_what_the_chat_door_would_take() -> None:
    for canonical in (anthropic(CLAUDE_CODE), responses(CODEX)):
        ChatCompletionRequest.model_validate(canonical)
