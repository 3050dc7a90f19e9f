"""Reads an SSE response into its data payloads, checking the framing on the way."""

from __future__ import annotations

import json
from typing import Any

import httpx


def parse_sse(text: str) -> tuple[list[dict[str, Any]], bool]:
    """Returns the JSON events and whether the stream ended with `[DONE]` as its last event."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events: list[dict[str, Any]] = []
    done = False
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        assert not done, "nothing may follow [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


async def stream_events(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]], bool]:
    response = await client.post("/v1/chat/completions", json={**payload, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(response.text)
    return response, events, done
