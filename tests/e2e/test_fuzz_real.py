"""Property-based, bounded, against the real server with the real SmolLM2 engine: the
template, tokenizer, grammar compiler and sampler see generated input too."""

from __future__ import annotations

from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings

from tests.e2e.server import RunningServer
from tests.fuzz.strategies import chat_bodies, encoded

MODELS = ["mimo-v2-flash", "mimo-v2-pro"]


def bounded(body: dict[str, Any]) -> dict[str, Any]:
    # Keep each generation short: what is fuzzed is the path to the engine, not its speed.
    body = {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens")}
    return {**body, "max_completion_tokens": 8}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=chat_bodies(MODELS))
def test_generated_bodies_against_the_real_engine(
    server: RunningServer, body: dict[str, Any]
) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=encoded(bounded(body)),
                          headers={"api-key": server.api_key, "content-type": "application/json"},
                          timeout=120)  # fmt: skip
    status = response.status_code
    assert status < 500 or (status == 503 and response.headers.get("retry-after")), (
        status, response.text[:500], body)  # fmt: skip
    if status != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_known_crashers_then_a_normal_request(server: RunningServer) -> None:
    headers = {"api-key": server.api_key}
    url = f"{server.base_url}/v1/chat/completions"
    cases: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                      {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": None, "tool_calls": []},
                      {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "c", "type": "function",
                                      "function": {"name": "f", "arguments": "[" * 5000}}]},
                      {"role": "tool", "tool_call_id": "c", "content": "r"}]},
        {"messages": [{"role": "user", "content": "Return {}"}],
         "response_format": {"type": "json_object"}, "ignore_eos": True, "temperature": 0},
        {"messages": [{"role": "user", "content": "hi"}], "stream": None, "stop": None},
    ]  # fmt: skip
    for case in cases:
        body = {"model": "mimo-v2-flash", "max_completion_tokens": 40, **case}
        response = httpx.post(url, json=body, headers=headers, timeout=120)
        assert response.status_code == 200, (response.text, case)
    assert server.process.poll() is None
    ok = httpx.post(url, headers=headers, timeout=60, json={
        "model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Say hi"}],
        "max_completion_tokens": 4})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
