"""OpenAI's predicted outputs through the chat door (scripted backend): the prediction
reaches the engine as a guess, never as output; usage reports what was accepted and
rejected, streamed and whole; malformed or oversized predictions are a 400."""

from __future__ import annotations

from typing import Any

import httpx

from mimoserve.events import ContentDelta, Finished, Progress, Started, TokenUsage
from mimoserve.protocol.chat import MAX_PREDICTION_CHARS, Prediction
from tests.api.sse_client import stream_events
from tests.fake_backend import ScriptedBackend

URL = "/v1/chat/completions"
FILE = "def add(a, b):\n    return a + b\n"


def payload(**fields: Any) -> dict[str, Any]:
    base = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Rename add."}]}
    return {**base, **fields}


def engine_with_usage(backend: ScriptedBackend, accepted: int, rejected: int) -> None:
    async def generate(request: Any) -> Any:
        backend.requests.append(request)
        yield Started(prompt_tokens=7)
        yield Progress(12)
        yield ContentDelta("def plus(a, b):\n    return a + b\n")
        yield Finished("stop", TokenUsage(
            7, 12, draft_tokens=accepted + rejected, accepted_draft_tokens=accepted,
            accepted_prediction_tokens=accepted, rejected_prediction_tokens=rejected,
        ))  # fmt: skip

    backend.generate = generate  # type: ignore[method-assign]


async def test_the_prediction_reaches_the_engine_and_usage_reports_it(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    engine_with_usage(backend, accepted=9, rejected=2)
    prediction = {"type": "content", "content": FILE}
    body = (await client.post(URL, json=payload(prediction=prediction))).json()
    assert backend.requests[-1].prediction == FILE
    assert body["choices"][0]["message"]["content"].startswith("def plus")
    details = body["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == 9
    assert details["rejected_prediction_tokens"] == 2
    metrics = (await client.get("/metrics")).text
    assert 'mimoserve:spec_draft_tokens_total{model="mimo-v2-flash"} 11.0' in metrics
    assert 'mimoserve:spec_accepted_tokens_total{model="mimo-v2-flash"} 9.0' in metrics
    assert 'mimoserve:spec_rejected_tokens_total{model="mimo-v2-flash"} 2.0' in metrics


async def test_text_parts_are_joined_and_streams_report_it_too(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    engine_with_usage(backend, accepted=4, rejected=0)
    parts = [{"type": "text", "text": "def add(a, b):\n"}, {"type": "text", "text": "    return"}]
    _, events, done = await stream_events(client, payload(
        stream_options={"include_usage": True}, prediction={"type": "content", "content": parts},
    ))  # fmt: skip
    assert done
    assert backend.requests[-1].prediction == "def add(a, b):\n    return"
    usage = events[-1]["usage"]
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == 4


async def test_without_a_prediction_both_counts_are_zero(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.enqueue(["Hi"])
    body = (await client.post(URL, json=payload())).json()
    details = body["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == details["rejected_prediction_tokens"] == 0


async def test_bad_predictions_are_400_naming_the_field(client: httpx.AsyncClient) -> None:
    for prediction in (
        {"type": "text", "content": FILE},  # wrong type
        {"type": "content"},  # no content
        {"type": "content", "content": 42},
        {"type": "content", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"type": "content", "content": [{"type": "text", "text": "x"}] * 1025},
        "just text",
    ):
        response = await client.post(URL, json=payload(prediction=prediction))
        assert response.status_code == 400, prediction
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert "prediction" in (error.get("param") or "") + error["message"], error


def test_a_prediction_longer_than_the_cap_is_refused() -> None:
    # (The app's body limit may refuse it first, with a 413: either way it never runs.)
    try:
        Prediction.model_validate({"type": "content", "content": "x" * (MAX_PREDICTION_CHARS + 1)})
    except ValueError as exc:
        assert "longer than" in str(exc)
    else:
        raise AssertionError("accepted an oversized prediction")
