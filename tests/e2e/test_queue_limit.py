"""Slots, the wait queue and its limit: batching, 503 with Retry-After, fairness."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.sse_client import parse_sse
from tests.e2e.server import RunningServer, running_server
from tests.e2e.test_raw_http import LONG, URL
from tests.waiting import until_sync


@pytest.fixture(scope="module")
def server(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Two sequences decode together, one request may wait, everything else is refused.
    home = tmp_path_factory.mktemp("home")
    with running_server(home, "--n-parallel", "2", "--max-queue", "1") as running:
        yield running


class StreamRecorder(threading.Thread):
    """Reads one streaming request, noting when each content chunk arrived."""

    def __init__(self, server: RunningServer, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.arrivals: list[float] = []
        self.text = ""
        self.started = threading.Event()

    def run(self) -> None:
        with (
            httpx.Client(base_url=self.server.base_url, timeout=120,
                         headers={"api-key": self.server.api_key}) as client,
            client.stream("POST", URL, json={**self.body, "stream": True}) as response,
        ):  # fmt: skip
            for chunk in response.iter_text():
                self.text += chunk
                if '"content"' in chunk:
                    self.arrivals.append(time.monotonic())
                    self.started.set()
        self.started.set()


def waiting(server: RunningServer) -> int:
    """Requests waiting for the engine, as /metrics says."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    found = re.search(r'^mimoserve:num_requests_waiting\{model="mimo-v2-flash"\} (\S+)$', text,
                      re.MULTILINE)  # fmt: skip
    return int(float(found.group(1))) if found else 0


def fill_both_slots(server: RunningServer, body: dict[str, Any]) -> tuple[StreamRecorder, ...]:
    recorders = StreamRecorder(server, body), StreamRecorder(server, body)
    for recorder in recorders:
        recorder.start()
    assert all(recorder.started.wait(60) for recorder in recorders)
    return recorders


def test_slots_run_together_queue_waits_and_overflow_is_503(server: RunningServer) -> None:
    body = {"model": "mimo-v2-flash", **LONG, "max_completion_tokens": 60}
    first, second = fill_both_slots(server, body)
    queued = StreamRecorder(server, {**body, "max_completion_tokens": 5})
    queued.start()
    until_sync(lambda: waiting(server) == 1, "the third request took the one waiting place")
    headers = {"api-key": server.api_key}
    refused = httpx.post(server.base_url + URL, json={**body, "max_completion_tokens": 5},
                         headers=headers, timeout=60)  # fmt: skip
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    for recorder in (first, second, queued):
        recorder.join(120)
    # Both running streams completed, and they advanced together: each received
    # tokens while the other was still streaming (one step decodes both).
    for recorder in (first, second, queued):
        events, done = parse_sse(recorder.text)
        assert done and events[-1]["choices"][0]["finish_reason"] == "length"
    overlap = min(first.arrivals[-1], second.arrivals[-1]) - max(
        first.arrivals[0], second.arrivals[0]
    )
    assert overlap > 0
    # The queued request started only when a slot was free.
    assert queued.arrivals[0] >= min(first.arrivals[-1], second.arrivals[-1]) - 0.05


def test_each_sequence_keeps_its_own_limits_and_stops(server: RunningServer) -> None:
    def ask(max_tokens: int, stop: list[str]) -> dict[str, Any]:
        response = httpx.post(
            server.base_url + URL,
            headers={"api-key": server.api_key},
            json={
                "model": "mimo-v2-flash",
                **LONG,
                "max_completion_tokens": max_tokens,
                "stop": stop,
            },
            timeout=120,
        )
        return response.json()  # type: ignore[no-any-return]

    results: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("short", ask(7, []))),
        threading.Thread(
            target=lambda: results.__setitem__("stopped", ask(200, ["forever forever"]))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["short"]["usage"]["completion_tokens"] == 7
    assert results["short"]["choices"][0]["finish_reason"] == "length"
    stopped = results["stopped"]["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert "forever forever" not in stopped["message"]["content"]
    assert results["stopped"]["usage"]["completion_tokens"] < 200


def test_shared_prefix_is_reused_and_reported(server: RunningServer) -> None:
    system = "You are a terse assistant. " + "Always answer in one short sentence. " * 40

    def ask(question: str) -> dict[str, Any]:
        response = httpx.post(
            server.base_url + URL,
            headers={"api-key": server.api_key},
            json={"model": "mimo-v2-flash", "max_completion_tokens": 4,
                  "messages": [{"role": "system", "content": system},
                               {"role": "user", "content": question}]},
            timeout=120,
        )  # fmt: skip
        return response.json()["usage"]  # type: ignore[no-any-return]

    ask("What is the sky's colour?")
    usage = ask("What is grass's colour?")
    assert usage["prompt_tokens"] > 300
    # Everything up to the user's question came from the KV cache.
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens"] - 20 <= cached < usage["prompt_tokens"]


def test_a_client_leaving_the_queue_frees_its_place(server: RunningServer) -> None:
    # Both slots stay busy for several seconds.
    body = {"model": "mimo-v2-flash", **LONG, "max_completion_tokens": 400}
    first, second = fill_both_slots(server, body)
    headers = {"api-key": server.api_key}
    # A streaming client takes the one waiting place, then gives up before its turn.
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=2) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(URL, json={**body, "stream": True})
    until_sync(lambda: waiting(server) == 0, "the client that left gave its place back")
    # Its place is free again: this request waits for a slot instead of a 503.
    both_busy = first.is_alive() and second.is_alive()
    waited = httpx.post(server.base_url + URL, json={**body, "max_completion_tokens": 3},
                        headers=headers, timeout=120)  # fmt: skip
    assert both_busy, "the request really had to wait for a slot"
    assert waited.status_code == 200, waited.text
    first.join(120)
    second.join(120)
