"""Bad input gets the contract's error body with the right status, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest

URL = "/v1/chat/completions"
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "mimo-v2-flash", "messages": GOOD_MESSAGES, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return cast(dict[str, Any], error)


BAD_PARAMETERS = [
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("top_p", 1.5),
    ("top_p", -1),
    ("top_p", "0.5"),
    ("frequency_penalty", 2.1),
    ("frequency_penalty", -3),
    ("presence_penalty", 2.5),
    ("presence_penalty", [1]),
    ("max_completion_tokens", 0),
    ("max_completion_tokens", -5),
    ("max_completion_tokens", 1.5),
    ("max_completion_tokens", "100"),
    ("max_tokens", 0),
    ("max_tokens", "ten"),
    ("stream", "yes"),
    ("stream", 1),
    ("stop", 5),
    ("stop", [""]),
    ("stop", ["a"] * 17),
    ("seed", "42"),
    ("seed", 4.2),
    ("n", 2),
    ("tools", "get_weather"),
    ("tools", [{"type": "function", "function": {"name": "has space"}}]),
    ("tool_choice", "sometimes"),
    ("response_format", {"type": "xml"}),
    ("thinking", {"type": "maybe"}),
    ("stream_options", {"include_usage": "yes"}),
    ("model", 7),
    ("model", ""),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMETERS)
async def test_out_of_range_or_wrong_type_is_400_naming_the_field(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    error = assert_error(await client.post(URL, json=body(**{field: value})), 400)
    assert error["param"].split(".")[0] == field
    assert error["type"] == "invalid_request_error"


def chat(messages: Any) -> dict[str, Any]:
    return {"model": "mimo-v2-flash", "messages": messages}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": GOOD_MESSAGES}, "model"),
        ({"model": "mimo-v2-flash"}, "messages"),
        (chat([]), "messages"),
        (chat("hi"), "messages"),
        (chat([{"role": "wizard", "content": "x"}]), "messages.0"),
        (chat([{"content": "no role"}]), "messages.0"),
        (chat([{"role": "user"}]), "messages.0.content"),
        (chat([{"role": "user", "content": 5}]), "messages.0.content"),
        ({"model": "mimo-v2-flash", "messages": [{"role": "tool", "content": "x"}]},
         "messages.0.tool_call_id"),
        ({"model": "mimo-v2-flash",
          "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    ],
)  # fmt: skip
async def test_missing_or_malformed_fields_are_400(
    client: httpx.AsyncClient, payload: dict[str, Any], param: str
) -> None:
    error = assert_error(await client.post(URL, json=payload), 400)
    assert error["param"].startswith(param), error


async def test_missing_field_gets_missing_code(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.post(URL, json={"messages": GOOD_MESSAGES}), 400, "model")
    assert error["code"] == "missing_required_parameter"


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL,
        content=b'{"model": "mimo-v2-flash", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert assert_error(response, 400)["code"] == "invalid_json"


async def test_non_object_json_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(URL, json=[1, 2]), 400)


async def test_wrong_content_type_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, content=b"model=x", headers={"content-type": "text/plain"})
    assert assert_error(response, 400)["code"] == "unsupported_content_type"


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    big = "x" * (2 * 1024 * 1024)
    response = await client.post(URL, json=body(messages=[{"role": "user", "content": big}]))
    assert assert_error(response, 413)["code"] == "request_too_large"


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    response = await client.post(
        URL, content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(response, 413)


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.post(URL, json=body(model="gpt-9")), 404, "model")
    assert error["code"] == "model_not_found"


async def test_unknown_route_is_404_in_the_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing-here"), 404)


async def test_wrong_method_is_405_in_the_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get(URL), 405)


async def test_named_tool_choice_must_exist(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    choice = {"type": "function", "function": {"name": "other"}}
    response = await client.post(URL, json=body(tools=tools, tool_choice=choice))
    assert_error(response, 400, "tool_choice.function.name")


async def test_tool_choice_without_tools_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(URL, json=body(tool_choice="required")), 400, "tool_choice")


async def test_image_part_to_a_text_model_names_part_and_model(client: httpx.AsyncClient) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    response = await client.post(URL, json=body(messages=[{"role": "user", "content": content}]))
    error = assert_error(response, 400, "messages.0.content.1")
    assert "image_url" in error["message"] and "mimo-v2-flash" in error["message"]


async def test_logprobs_are_refused_clearly(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(URL, json=body(logprobs=True)), 400, "logprobs")


async def test_unknown_extra_fields_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=body(frobnicate=True, top_k=5))
    assert response.status_code == 200, response.text


async def test_null_optional_values_are_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL, json=body(temperature=None, top_p=None, stop=None, max_tokens=None, tools=None)
    )
    assert response.status_code == 200, response.text
