"""A full wait queue answers 503 with Retry-After; the running stream is unaffected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.sse_client import parse_sse
from tests.e2e.server import RunningServer, running_server
from tests.e2e.test_raw_http import LONG, URL


@pytest.fixture(scope="module")
def server(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # No waiting room: while one request runs, every other one is refused at once.
    with running_server(tmp_path_factory.mktemp("home"), "--max-queue", "0") as running:
        yield running


def test_full_queue_is_503_with_retry_after(server: RunningServer) -> None:
    headers = {"api-key": server.api_key}
    body = {"model": "mimo-v2-flash", **LONG, "max_completion_tokens": 200, "stream": True}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        with client.stream("POST", URL, json=body) as running:
            raw = running.iter_text()
            received = next(raw)
            assert received.startswith("data: ")  # the first request is generating
            refused = client.post(URL, json={**body, "stream": False})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "server_error"
            # The running stream is not disturbed by the refusal: it completes normally.
            received += "".join(raw)
        events, done = parse_sse(received)
        assert done
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        # With the engine free again, the next request is served.
        small = {"model": "mimo-v2-flash", "max_completion_tokens": 2,
                 "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        assert client.post(URL, json=small).status_code == 200
