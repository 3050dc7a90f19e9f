"""Response and stream shapes, as in the contract's wire examples (fake backend)."""

from __future__ import annotations

from typing import Any

import httpx

from mimoserve.errors import EngineError, OverloadedError
from tests.api.sse_client import stream_events
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"


def payload(**fields: Any) -> dict[str, Any]:
    return {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}], **fields}


async def test_non_streaming_shape(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    backend.enqueue(["Hello", "!"], prompt_tokens=21, cached_tokens=4)
    data = (await client.post(URL, json=payload())).json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "mimo-v2-flash"
    assert data["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}
    ]
    assert data["usage"] == {
        "prompt_tokens": 21,
        "completion_tokens": 2,
        "total_tokens": 23,
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens_details": {"cached_tokens": 4},
    }


async def test_length_finish_reason(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    backend.enqueue(["a", "b"], reason="length")
    data = (await client.post(URL, json=payload(max_completion_tokens=2))).json()
    assert data["choices"][0]["finish_reason"] == "length"


async def test_sampling_reaches_the_backend(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(
        URL,
        json=payload(temperature=0.3, top_p=0.5, frequency_penalty=1, presence_penalty=-1,
                     seed=7, max_tokens=9, stop="END"),
    )  # fmt: skip
    sampling = backend.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.3, 0.5, 7)
    assert (sampling.frequency_penalty, sampling.presence_penalty) == (1.0, -1.0)
    assert (sampling.max_tokens, sampling.stop) == (9, ("END",))


async def test_max_completion_tokens_wins_over_max_tokens(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json=payload(max_completion_tokens=5, max_tokens=50))
    assert backend.requests[-1].sampling.max_tokens == 5


async def test_hosted_sampling_defaults(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json=payload())
    sampling = backend.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (1.0, 0.95, None)


async def test_history_of_every_role_is_normalised(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    function = {"name": "get_weather", "arguments": '{"city": "Beijing"}'}
    call = {"id": "call_1", "type": "function", "function": function}
    messages = [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Beijing?"}]},
        {"role": "assistant", "content": None, "reasoning": "call the tool", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 3}"},
    ]  # fmt: skip
    response = await client.post(URL, json={"model": "mimo-v2-flash", "messages": messages})
    assert response.status_code == 200, response.text
    sent = backend.requests[-1].messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[1].content == "Weather\nin Beijing?"
    assert sent[2].reasoning_content == "call the tool"
    assert sent[2].tool_calls[0]["function"]["name"] == "get_weather"
    assert sent[3].tool_call_id == "call_1"


async def test_stream_shape_without_usage(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Hel", "", "lo"])
    _, events, done = await stream_events(client, payload())
    assert done
    assert len({e["id"] for e in events}) == 1
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    choices = [e["choices"][0] for e in events]
    assert choices[0] == {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
    # Empty pieces are not sent; deltas carry only what they hold.
    assert [c["delta"] for c in choices[1:-1]] == [{"content": "Hel"}, {"content": "lo"}]
    assert choices[-1] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all("usage" not in e for e in events)


async def test_stream_with_usage_adds_one_final_usage_chunk(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["a", "b", "c"], prompt_tokens=10)
    _, events, done = await stream_events(client, payload(stream_options={"include_usage": True}))
    assert done
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] == 13
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events[:-1])


async def test_include_usage_false_sends_no_usage(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    _, events, _ = await stream_events(client, payload(stream_options={"include_usage": False}))
    assert all("usage" not in e for e in events)


async def test_error_after_stream_start_is_an_event_then_done(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["partial"], fail_with=EngineError("engine failed while generating"))
    response, events, done = await stream_events(client, payload())
    assert response.status_code == 200
    assert done
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    assert events[-1] == {
        "error": {"message": "engine failed while generating", "type": "server_error",
                  "param": None, "code": "engine_error"}
    }  # fmt: skip


async def test_unexpected_crash_mid_stream_does_not_leak_details(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["x"], fail_with=RuntimeError("secret internal detail"))
    _, events, done = await stream_events(client, payload())
    assert done and events[-1]["error"]["code"] == "engine_error"
    assert "secret internal detail" not in str(events)


async def test_refusal_before_stream_start_is_a_plain_http_error(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue([], refuse_with=OverloadedError("queue full", retry_after_s=3))
    response = await client.post(URL, json=payload(stream=True))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "overloaded"


async def test_models_list_and_get(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {"mimo-v2-flash", "mimo-v2-pro", "mimo-xml"}
    card = (await client.get("/v1/models/mimo-v2-pro")).json()
    assert card["object"] == "model" and card["root"] == "fake-weights"
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_backend_stream_is_closed_after_each_request(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json=payload())
    await stream_events(client, payload())
    assert backend.closed_streams == 2


async def test_ignore_eos_extension_reaches_the_sampler(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json=payload(ignore_eos=True, max_tokens=5))
    assert backend.requests[-1].sampling.ignore_eos is True
    await client.post(URL, json=payload())
    assert backend.requests[-1].sampling.ignore_eos is False


async def test_top_k_and_min_p_extensions(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json=payload())
    assert (backend.requests[-1].sampling.top_k, backend.requests[-1].sampling.min_p) == (40, 0.0)
    await client.post(URL, json=payload(top_k=0, min_p=0.1))
    assert (backend.requests[-1].sampling.top_k, backend.requests[-1].sampling.min_p) == (0, 0.1)
    bad = await client.post(URL, json=payload(top_k=-1))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
