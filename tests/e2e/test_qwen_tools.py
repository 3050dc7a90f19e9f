"""Tools, reasoning and structured output on the embedded default model, Qwen2.5-Coder-0.5B.

These run the real default weights through the openai SDK, as a MiMo agent would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from mimoserve.weights.catalog import DEFAULT_WEIGHTS
from tests.e2e.server import pull_test_weights, running_server

WEATHER_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_weather",
     "description": "Get the current weather for a city", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time",
     "description": "Get the local time in a time zone",
     "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                    "required": ["zone"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Beijing right now?"}
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    pull_test_weights(DEFAULT_WEIGHTS)
    home = tmp_path_factory.mktemp("qwen")
    # No speculation here: these tests compare reruns of one request (streamed and whole)
    # token for token, and guesses, whose sources learn between requests, change the
    # batch shapes and so llama.cpp's rounding (see test_speculation_real.py).
    with running_server(home, "--n-ctx", "4096", "--spec-max-draft", "0",
                        weights=DEFAULT_WEIGHTS) as server:  # fmt: skip
        yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)


def _run(client: openai.OpenAI, stream: bool, **request: Any) -> dict[str, Any]:
    """One request, streamed or not, reassembled into {content, reasoning, calls, finish}."""
    base: dict[str, Any] = {"model": "mimo-v2-flash", "messages": QUESTION, "tools": TOOLS,
                            "max_completion_tokens": 120}  # fmt: skip
    base.update(request)
    if not stream:
        choice = client.chat.completions.create(**base).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
        return {"content": choice.message.content or "", "reasoning": reasoning,
                "calls": calls, "finish": choice.finish_reason}  # fmt: skip
    content, reasoning, finish = "", "", None
    pieces: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**base, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = pieces.setdefault(call.index, ["", ""])
                entry[0] += (call.function and call.function.name) or ""
                entry[1] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    calls = [(pieces[i][0], pieces[i][1]) for i in sorted(pieces)]
    return {"content": content, "reasoning": reasoning, "calls": calls, "finish": finish}


def _assert_valid_call(result: dict[str, Any], name: str | None = None) -> None:
    assert result["finish"] == "tool_calls", result
    assert result["calls"], result
    for called, arguments in result["calls"]:
        assert name is None or called == name
        jsonschema.validate(json.loads(arguments), SCHEMAS[called])


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_is_always_a_valid_call(qwen: openai.OpenAI, stream: bool) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(20):
        result = _run(qwen, stream, tool_choice=choice, seed=seed, temperature=1.0)
        _assert_valid_call(result, "get_weather")


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_is_always_a_valid_call(qwen: openai.OpenAI, stream: bool) -> None:
    for seed in range(20):
        _assert_valid_call(_run(qwen, stream, tool_choice="required", seed=seed, temperature=1.0))


def test_auto_calls_the_tool_for_an_obvious_question(qwen: openai.OpenAI) -> None:
    result = _run(qwen, False, seed=1, temperature=0.3)
    _assert_valid_call(result, "get_weather")
    assert "Beijing" in result["calls"][0][1]


def test_tool_choice_none_answers_in_text(qwen: openai.OpenAI) -> None:
    result = _run(qwen, False, seed=1, temperature=0.3, tool_choice="none")
    assert result["calls"] == [] and result["content"] and result["finish"] in {"stop", "length"}


def test_two_turn_tool_loop(qwen: openai.OpenAI) -> None:
    first = qwen.chat.completions.create(
        model="mimo-v2-flash", messages=QUESTION, tools=TOOLS, tool_choice="required", seed=3
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[ChatCompletionMessageParam] = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 3, "sky": "snow"}'},
    ]
    # The agent has its result and asks for the answer (a 0.5B model given tools again
    # tends to call them again; the loop itself is what is tested here).
    second = qwen.chat.completions.create(
        model="mimo-v2-flash", messages=history, tools=TOOLS, tool_choice="none", seed=3,
        temperature=0.3, max_completion_tokens=80,
    )  # fmt: skip
    answer = second.choices[0]
    assert answer.finish_reason in {"stop", "length"}
    assert answer.message.content and not answer.message.tool_calls
    assert "3" in answer.message.content or "snow" in answer.message.content.lower()


def test_thinking_enabled_gives_reasoning_and_answer(qwen: openai.OpenAI) -> None:
    body = {"messages": [{"role": "user", "content": "What is 17 times 3?"}], "tools": None,
            "seed": 5, "temperature": 0.3, "max_completion_tokens": 300}  # fmt: skip
    on = qwen.chat.completions.create(
        model="mimo-v2-pro", **body, extra_body={"thinking": {"type": "enabled"}}
    )  # type: ignore[call-overload]
    message = on.choices[0].message
    assert getattr(message, "reasoning_content", None), message
    assert message.content and message.content.strip()
    assert on.usage.completion_tokens_details.reasoning_tokens > 0
    off = qwen.chat.completions.create(
        model="mimo-v2-pro", **body, extra_body={"thinking": {"type": "disabled"}}
    )  # type: ignore[call-overload]
    assert not getattr(off.choices[0].message, "reasoning_content", None)
    assert off.choices[0].message.content
    assert off.usage.completion_tokens_details.reasoning_tokens == 0


def test_json_schema_output_validates(qwen: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
              "age": {"type": "integer"}}, "required": ["name", "age"]}  # fmt: skip
    for stream in (False, True):
        result = _run(qwen, stream, tools=None, seed=2,
                      messages=[{"role": "user", "content": "Invent a person."}],
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": "person", "schema": schema}})  # fmt: skip
        jsonschema.validate(json.loads(result["content"]), schema)


@pytest.mark.parametrize("extra", [{"tool_choice": "auto"}, {"tool_choice": "required"},
                                   {"tools": None, "model": "mimo-v2-pro"}])  # fmt: skip
def test_stream_and_non_stream_are_the_same_answer(
    qwen: openai.OpenAI, extra: dict[str, Any]
) -> None:
    request = {"seed": 11, "temperature": 0.8, **extra}
    _run(qwen, False, **request)  # warm-up: both runs below see the same prompt cache
    whole = _run(qwen, False, **request)
    streamed = _run(qwen, True, **request)
    assert streamed == whole


CONSTRAINTS: dict[str, dict[str, Any]] = {
    "json_object": {"response_format": {"type": "json_object"}, "tools": None},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": WEATHER_SCHEMA}}, "tools": None},
    "required_tool": {"tool_choice": "required"},
    "named_tool": {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
}  # fmt: skip
END_RULES: dict[str, dict[str, Any]] = {
    "plain": {},
    "ignore_eos": {"extra_body": {"ignore_eos": True}},
    "thinking_guard": {"extra_body": {"thinking": {"type": "enabled", "budget_tokens": 8}}},
    "stop": {"stop": ["}", '"']},
}


def test_engine_torture_every_constraint_with_every_end_rule(
    qwen: openai.OpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every constraint x every rule touching the end token x tiny/huge budgets x stream
    and not: each request is answered, the grammar's output is never broken by the engine,
    and the server stays up (a grammar handed a rejected token aborted the process)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [
        (constraint, rule, budget, stream)
        for constraint in CONSTRAINTS for rule in END_RULES
        for budget in (1, 100_000) for stream in (False, True)
    ]  # fmt: skip

    def run(case: tuple[str, str, int, bool]) -> tuple[tuple[str, str, int, bool], dict[str, Any]]:
        constraint, rule, budget, stream = case
        request = {"temperature": 0, "max_completion_tokens": budget,
                   "messages": [{"role": "user", "content": "Return {}"}],
                   **CONSTRAINTS[constraint], **END_RULES[rule]}  # fmt: skip
        if request.get("tools", TOOLS) is None:
            request.pop("tools")
        return case, _run(qwen, stream, **request)

    with ThreadPoolExecutor(4) as pool:  # four at a time: they share decode batches
        results = list(pool.map(run, cases))
    for (constraint, rule, budget, _), result in results:
        assert result["finish"] in ("stop", "length", "tool_calls"), (constraint, rule, result)
        for _, arguments in result["calls"]:  # streamed calls parse, even when cut short
            assert isinstance(json.loads(arguments), dict), result
        if budget == 1 or rule == "stop" or result["finish"] == "length":
            continue  # cut where the stop or the context ends: no completeness to check
        if constraint.endswith("tool"):
            _assert_valid_call(result, "get_time" if constraint == "named_tool" else None)
        else:
            answer = json.loads(result["content"])
            assert isinstance(answer, dict), result
            if constraint == "json_schema":
                jsonschema.validate(answer, WEATHER_SCHEMA)
    models = qwen.models.list()
    assert models.data  # the server is still up and answering
