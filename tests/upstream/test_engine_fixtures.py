"""vLLM's and SGLang's documented wire formats, replayed through the relay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimoserve.backends.upstream import wire
from mimoserve.errors import InvalidRequestError
from tests.upstream.canned import FIXTURES, Canned, serve_in_thread
from tests.upstream.conftest import registry_for, running_gateway
from tests.upstream.test_relay import CHAT, sse


@pytest.mark.parametrize(("fixture", "kind"), [("vllm_reasoning.json", "vllm"),
                                               ("sglang_reasoning.json", "sglang")])  # fmt: skip
def test_non_stream_reasoning_in_either_field(fixture: str, kind: str, tmp_path: Path) -> None:
    engine = Canned(mode="replay", replay=fixture)
    with serve_in_thread(engine) as url, \
            running_gateway(tmp_path, registry_for(url, kind=kind)) as gw, gw.client() as client:  # fmt: skip
        body = client.post("/v1/chat/completions", json=CHAT).json()
    message = body["choices"][0]["message"]
    assert set(message) == {"role", "content", "reasoning_content"}  # no engine extras
    assert message["reasoning_content"] and message["content"]
    assert set(body["choices"][0]) == {"index", "message", "finish_reason"}
    assert body["usage"]["total_tokens"] == 40 if kind == "vllm" else 25


def test_vllm_tool_call_and_cached_tokens(tmp_path: Path) -> None:
    engine = Canned(mode="replay", replay="vllm_tool_call.json")
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw, \
            gw.client() as client:  # fmt: skip
        body = client.post("/v1/chat/completions", json=CHAT).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "I should call the weather tool."
    [call] = choice["message"]["tool_calls"]
    assert call == {
        "id": "chatcmpl-tool-4b1e",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96


def test_vllm_stream_with_reasoning_and_tool_call_deltas(tmp_path: Path) -> None:
    engine = Canned(mode="replay", replay="vllm_stream_tool_call.sse")
    with serve_in_thread(engine) as url, running_gateway(tmp_path, registry_for(url)) as gw, \
            gw.client() as client:  # fmt: skip
        asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=asked) as r:
            events, done = sse(r)
    assert done
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants weather."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "chatcmpl-tool-8c2", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city": "Paris"}'
    assert all("content" not in d for d in deltas[1:]), "empty content strings are dropped"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 20
    for event in events:
        for choice in event["choices"]:
            assert set(choice) <= {"index", "delta", "finish_reason"}  # no stop_reason, logprobs


def test_sglang_stream_drops_null_fields(tmp_path: Path) -> None:
    engine = Canned(mode="replay", replay="sglang_stream.sse")
    with serve_in_thread(engine) as url, \
            running_gateway(tmp_path, registry_for(url, kind="sglang")) as gw, gw.client() as client, \
            client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:  # fmt: skip
        events, done = sse(r)
    assert done and all("usage" not in e for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant"}
    assert all(None not in d.values() for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == "Hello! How can I help?"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Simple greeting."


def test_engine_error_shapes() -> None:
    too_long = wire.error_from_status(400, (FIXTURES / "vllm_error_400.json").read_bytes())
    assert isinstance(too_long, InvalidRequestError) and "maximum context" in too_long.message
    missing = wire.error_from_status(404, (FIXTURES / "sglang_error_404.json").read_bytes())
    assert isinstance(missing, wire.UpstreamFailure) and missing.code == "upstream_model_missing"
    bare = wire.error_from_status(401, b'{"error":"Unauthorized"}')
    assert bare.status_code == 503 and bare.code == "upstream_auth_failed"
    fastapi_style = wire.error_from_status(422, json.dumps({"detail": [{"msg": "bad"}]}).encode())
    assert fastapi_style.status_code == 400 and "bad" in fastapi_style.message
    html = wire.error_from_status(502, b"<html>Bad Gateway</html>")
    assert html.status_code == 503 and "Bad Gateway" in html.message
    overloaded = wire.error_from_status(429, b"{}")
    assert overloaded.status_code == 503 and overloaded.code == "upstream_overloaded"


def test_request_body_per_engine_kind() -> None:
    from mimoserve.protocol.chat import ChatCompletionRequest
    from mimoserve.registry import UpstreamSpec

    request = ChatCompletionRequest.model_validate({
        **CHAT, "stream": True, "thinking": {"type": "disabled"}, "top_k": 20,
        "max_tokens": 50, "some_vendor_field": 1,
    })  # fmt: skip
    vllm = wire.request_body(request, UpstreamSpec(url="http://x/v1", kind="vllm", model="M"), "id")
    assert vllm["model"] == "M" and vllm["chat_template_kwargs"] == {"enable_thinking": False}
    assert vllm["stream_options"] == {"include_usage": True} and vllm["top_k"] == 20
    assert "thinking" not in vllm and "some_vendor_field" not in vllm and vllm["max_tokens"] == 50
    ours = wire.request_body(request, UpstreamSpec(url="http://x/v1", kind="mimoserve"), "id")
    assert ours["model"] == "id" and ours["thinking"] == {"type": "disabled"}
    openai = wire.request_body(request, UpstreamSpec(url="http://x/v1", kind="openai"), "id")
    assert "top_k" not in openai and "thinking" not in openai and "max_tokens" not in openai
    assert openai["max_completion_tokens"] == 50
    assert "chat_template_kwargs" not in openai


def test_the_clients_own_body_is_forwarded_without_unknown_top_level_fields() -> None:
    from mimoserve.protocol.chat import ChatCompletionRequest
    from mimoserve.registry import UpstreamSpec

    raw = json.dumps({
        "model": "mimo-v2-flash", "vendor_field": True, "max_completion_tokens": 9,
        "messages": [{"role": "user", "content": "Hi", "x-trace": "kept inside messages"}],
    }).encode()  # fmt: skip
    request = ChatCompletionRequest.model_validate_json(raw)
    body = wire.request_body(request, UpstreamSpec(url="http://x/v1", kind="sglang"), "id", raw)
    assert "vendor_field" not in body and body["max_tokens"] == 9
    assert body["messages"][0]["x-trace"] == "kept inside messages"
    assert body["model"] == "id"


def test_a_prediction_goes_to_every_engine_as_sent() -> None:
    from mimoserve.protocol.chat import ChatCompletionRequest
    from mimoserve.registry import UpstreamSpec

    prediction = {"type": "content", "content": [{"type": "text", "text": "def f(): ..."}]}
    request = ChatCompletionRequest.model_validate({**CHAT, "prediction": prediction})
    for kind in ("vllm", "sglang", "llama.cpp", "openai", "mimoserve"):
        body = wire.request_body(request, UpstreamSpec(url="http://x/v1", kind=kind), "id")
        assert body["prediction"] == prediction, kind
