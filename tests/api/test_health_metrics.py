from __future__ import annotations

import re

import httpx

from mimoserve.errors import EngineError, OverloadedError
from mimoserve.store.sqlite import Database
from tests.api.sse_client import stream_events
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"
BODY = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}


def sample(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


async def metrics(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics", headers={"api-key": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_ready_reports_the_store(client: httpx.AsyncClient, database: Database) -> None:
    ok = await client.get("/ready", headers={"api-key": ""})
    assert ok.status_code == 200 and ok.json()["status"] == "ready"
    database.close()  # the store goes away
    down = await client.get("/ready", headers={"api-key": ""})
    assert down.status_code == 503 and down.json()["store"] == "unreachable"


async def test_successful_requests_are_counted_with_tokens_and_latency(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["a", "b", "c"], prompt_tokens=11, cached_tokens=4)
    await client.post(URL, json=BODY)
    backend.enqueue(["x"], prompt_tokens=5)
    await stream_events(client, BODY)
    text = await metrics(client)
    assert sample(text, "mimoserve:requests_total", model="mimo-v2-flash", status="200") == 2
    assert sample(text, "mimoserve:prompt_tokens_total", model="mimo-v2-flash") == 16
    assert sample(text, "mimoserve:generation_tokens_total", model="mimo-v2-flash") == 4
    assert sample(text, "mimoserve:prompt_tokens_cached_total", model="mimo-v2-flash") == 4
    assert sample(text, "mimoserve:time_to_first_token_seconds_count", model="mimo-v2-flash") == 2
    assert sample(text, "mimoserve:e2e_request_latency_seconds_count", model="mimo-v2-flash") == 2
    assert (
        sample(
            text, "mimoserve:request_success_total", model="mimo-v2-flash", finished_reason="stop"
        )
        == 2
    )


async def test_refusals_and_failures_are_counted_by_status(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    await client.post(URL, json={**BODY, "temperature": 9})  # no valid body: model unknown
    await client.post(URL, json={**BODY, "tool_choice": "required"})  # valid body, refused
    await client.post(URL, json={**BODY, "model": "made-up-model"})
    backend.enqueue([], refuse_with=OverloadedError("busy"))
    await client.post(URL, json=BODY)
    backend.enqueue(["partial"], fail_with=EngineError("boom"))
    await stream_events(client, BODY)
    text = await metrics(client)
    assert sample(text, "mimoserve:requests_total", model="mimo-v2-flash", status="400") == 1
    assert sample(text, "mimoserve:requests_total", model="unknown", status="400") == 1
    assert sample(text, "mimoserve:requests_total", model="unknown", status="404") == 1
    assert sample(text, "mimoserve:requests_total", model="mimo-v2-flash", status="503") == 1
    assert sample(text, "mimoserve:requests_total", model="mimo-v2-flash", status="500") == 1
    assert (
        sample(
            text, "mimoserve:request_aborted_total", model="mimo-v2-flash", reason="engine_error"
        )
        == 1
    )
    assert "made-up-model" not in text


async def test_engine_load_gauges(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    backend.load = lambda: (3, 2)  # type: ignore[method-assign]
    text = await metrics(client)
    assert sample(text, "mimoserve:num_requests_running", model="mimo-v2-flash") == 3
    assert sample(text, "mimoserve:num_requests_waiting", model="mimo-v2-flash") == 2
    # Every id is served by this one backend: its load is reported once, under the first.
    assert 'num_requests_running{model="mimo-v2-pro"}' not in text


def test_fastapi_telemetry_is_off_unless_asked_for() -> None:
    import inspect

    from fastapi import FastAPI

    from mimoserve.app import _telemetry_options

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        assert _telemetry_options(False) == {}  # an older FastAPI has nothing to turn off
        return
    off = _telemetry_options(False)["telemetry"]
    assert not any(off.values())
    native = getattr(FastAPI(**_telemetry_options(False)), "_native_telemetry", None)
    assert native is None or native.enabled() is False
    assert _telemetry_options(True) == {}


async def test_ready_reports_a_dead_engine(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    assert (await client.get("/ready")).json()["engines"] == "ok"
    backend.healthy = False
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json()["engines"].startswith("down: ")
