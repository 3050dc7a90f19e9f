"""Hypothesis strategies for what an attacker sends to the chat route: bodies that are
almost right, bodies that are wholly wrong, and bytes that are not JSON at all."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Every code point, lone surrogates, NUL and control characters included.
nasty_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["", "\x00", "\ud800", "<|im_start|>system\n", "<think>", "```" + " " * 2000,
     "[" * 3000, "{" * 3000, "\u202e", "x" * 5000]
)  # fmt: skip

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | nasty_text
)  # fmt: skip

json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=20,
)

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"])


@st.composite
def messages(draw: st.DrawFn) -> Any:
    message: dict[str, Any] = {"role": draw(roles)}
    message["content"] = draw(st.none() | nasty_text | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]),
                               "text": nasty_text}), max_size=3))  # fmt: skip
    if draw(st.booleans()):
        message["tool_calls"] = draw(st.lists(st.fixed_dictionaries({
            "id": nasty_text, "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": nasty_text, "arguments": nasty_text}),
        }), max_size=2))  # fmt: skip
    if draw(st.booleans()):
        message[draw(nasty_text)] = draw(json_values)
    return message


FIELDS = {
    "stream": st.none() | st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_completion_tokens": st.none() | st.integers(-5, 64),
    "max_tokens": st.none() | st.integers(-5, 64),
    "temperature": st.none() | st.floats(-1, 3),
    "top_p": st.none() | st.floats(-0.5, 1.5),
    "stop": st.none() | nasty_text | st.lists(nasty_text, max_size=5),
    "seed": st.none() | st.integers(-(2**70), 2**70),
    "ignore_eos": st.none() | st.booleans(),
    "response_format": st.none() | st.sampled_from([
        {"type": "json_object"}, {"type": "text"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://evil/x"}}},
    ]) | json_values,
    "tools": st.none() | st.lists(st.fixed_dictionaries({
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "bad name"]),
                                           "parameters": json_values}),
    }), max_size=3),
    "tool_choice": st.none() | st.sampled_from(["auto", "none", "required"])
    | st.just({"type": "function", "function": {"name": "f"}}) | json_values,
    "thinking": st.none() | st.sampled_from([{"type": "enabled", "budget_tokens": 4},
                                             {"type": "disabled"}]) | json_values,
    "logprobs": st.none() | st.booleans(),
    "top_logprobs": st.none() | st.integers(-2, 25) | json_values,
    "n": st.none() | st.integers(-1, 3),
}  # fmt: skip


@st.composite
def chat_bodies(draw: st.DrawFn, models: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(models) | nasty_text),
        "messages": draw(st.lists(messages(), min_size=0, max_size=4)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True)):
        body[name] = draw(FIELDS[name])
    if draw(st.integers(0, 9)) == 0:  # now and then a field of the wrong shape entirely
        body[draw(st.sampled_from([*FIELDS, "model", "messages"]))] = draw(json_values)
    return body


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


raw_bodies = (
    st.binary(max_size=300)
    | json_values.map(encoded)
    | st.integers(1, 6000).map(lambda depth: b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}")
    | st.integers(1, 6000).map(lambda depth: b"{" * depth)
)  # fmt: skip

header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=80)


blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "bogus"])},
    optional={"text": nasty_text, "id": nasty_text, "name": nasty_text, "input": json_values,
              "tool_use_id": nasty_text, "content": nasty_text | json_values,
              "thinking": nasty_text, "source": json_values, "is_error": st.booleans()},
)  # fmt: skip


@st.composite
def anthropic_bodies(draw: st.DrawFn, models: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(models) | nasty_text),
        "max_tokens": draw(st.integers(-2, 64) | st.none()),
        "messages": draw(st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "assistant", "system", "bogus"]),
            "content": nasty_text | st.lists(blocks, max_size=3)}), max_size=3)),
    }  # fmt: skip
    optional = {
        "system": nasty_text | st.lists(blocks, max_size=2),
        "tools": st.lists(st.fixed_dictionaries({"name": nasty_text, "input_schema": json_values}),
                          max_size=2),
        "tool_choice": json_values | st.sampled_from([{"type": "any"}, {"type": "tool", "name": "f"}]),
        "thinking": json_values | st.sampled_from([{"type": "adaptive"}, {"type": "enabled", "budget_tokens": 5}]),
        "stream": st.booleans(), "stop_sequences": st.lists(nasty_text, max_size=3),
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        body[name] = draw(optional[name])
    return body


@st.composite
def responses_bodies(draw: st.DrawFn, models: list[str]) -> dict[str, Any]:
    item = st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "x"])},
        optional={"role": st.sampled_from(["user", "developer", "assistant", "tool"]),
                  "content": nasty_text | st.lists(st.fixed_dictionaries(
                      {"type": st.sampled_from(["input_text", "output_text", "input_image", "y"]),
                       "text": nasty_text}), max_size=2),
                  "call_id": nasty_text, "name": nasty_text, "arguments": nasty_text,
                  "output": nasty_text | json_values},
    )  # fmt: skip
    body: dict[str, Any] = {"model": draw(st.sampled_from(models) | nasty_text),
                            "input": draw(nasty_text | st.lists(item, max_size=4))}  # fmt: skip
    optional = {
        "instructions": nasty_text, "max_output_tokens": st.integers(-1, 64),
        "tools": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "custom", "namespace", "web_search"]),
                                                 "name": nasty_text, "parameters": json_values}), max_size=3),
        "tool_choice": json_values, "reasoning": json_values | st.just({"effort": "none"}),
        "text": json_values, "stream": st.booleans(), "previous_response_id": nasty_text,
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        body[name] = draw(optional[name])
    return body
