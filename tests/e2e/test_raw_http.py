"""The real server over raw HTTP and SSE: the seed's curl, stops, disconnects, limits."""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import httpx
import pytest

from tests.api.sse_client import parse_sse
from tests.e2e.server import RunningServer, cli
from tests.waiting import until_sync

URL = "/v1/chat/completions"
LONG = {
    # Negative penalties make the tiny model repeat itself instead of ending its turn,
    # so this request would run for thousands of tokens unless it is cancelled.
    "messages": [{"role": "user", "content": "Repeat the word hello forever."}],
    "max_completion_tokens": 3000,
    "temperature": 0,
    "frequency_penalty": -2,
    "presence_penalty": -2,
}


def post(server: RunningServer, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(
        server.base_url + URL,
        json={"model": "mimo-v2-flash", **body},
        headers={"api-key": server.api_key},
        timeout=kwargs.pop("timeout", 120),
        **kwargs,
    )


def test_seed_curl_example_with_api_key_header(server: RunningServer) -> None:
    # The reference's example request, byte for byte apart from the host and key.
    response = httpx.post(
        server.base_url + URL,
        headers={"Content-Type": "application/json", "api-key": server.api_key},
        content=b"""{
"model": "mimo-v2-pro",
"messages": [
{"role": "system", "content": "You are a helpful assistant."},
{"role": "user", "content": "Hello, who are you?"}
],
"max_completion_tokens": 1024,
"temperature": 0.7
}""",
        timeout=120,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]
    assert data["choices"][0]["finish_reason"] in {"stop", "length"}
    assert data["usage"]["prompt_tokens"] > 0


def test_raw_sse_stream(server: RunningServer) -> None:
    response = post(server, {"messages": [{"role": "user", "content": "Hello!"}], "stream": True,
                             "max_completion_tokens": 20})  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(response.text)
    assert done
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    assert deltas and all(set(d) == {"content"} and d["content"] for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_is_cut_even_across_tokens(server: RunningServer, stream: bool) -> None:
    base = {"messages": [{"role": "user", "content": "Describe the sun in two sentences."}],
            "temperature": 0, "max_completion_tokens": 40}  # fmt: skip
    post(server, base)  # warm-up: the next runs share one prompt-cache state
    reference = post(server, base).json()["choices"][0]["message"]["content"]
    middle = len(reference) // 2
    stop = reference[middle : middle + 6]  # six characters: usually spans several tokens
    expected = reference[: reference.find(stop)]
    response = post(server, {**base, "stop": ["@@never@@", stop], "stream": stream})
    if stream:
        events, done = parse_sse(response.text)
        assert done
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        text = response.json()["choices"][0]["message"]["content"]
        finish = response.json()["choices"][0]["finish_reason"]
    assert text == expected
    assert stop not in text
    assert finish == "stop"


def test_multibyte_text_survives_streaming(server: RunningServer) -> None:
    """The streamed text is exactly the UTF-8 of the tokens' bytes (their logprobs carry
    them), whatever the tokens are. Comparing with a second, whole answer instead was
    flaky: greedy near-ties can flip when a prompt's cells sit elsewhere in the pool."""
    body = {"messages": [{"role": "user", "content": "Write 你好世界 and 😀 ten times."}],
            "temperature": 0, "max_completion_tokens": 60, "stream": True, "logprobs": True}  # fmt: skip
    events, _ = parse_sse(post(server, body).text)
    choices = [e["choices"][0] for e in events if e["choices"]]
    streamed = "".join(choice["delta"].get("content") or "" for choice in choices)
    tokens = [t for choice in choices for t in (choice.get("logprobs") or {}).get("content") or []]
    assert len(tokens) >= 50, tokens  # every generated token but the end of turn
    expected = b"".join(bytes(token["bytes"]) for token in tokens).decode(errors="replace")
    # A character split across tokens must arrive whole. Only the very end may hold a
    # U+FFFD: when max tokens cut a character in two, its lone bytes are shown, not hidden.
    finish = choices[-1]["finish_reason"]
    if finish == "length":
        streamed, expected = streamed.rstrip("\ufffd"), expected.rstrip("\ufffd")
    assert streamed == expected
    assert "\ufffd" not in streamed
    assert any(ord(ch) > 127 for ch in streamed), streamed


def test_prompt_longer_than_context_is_400(server: RunningServer) -> None:
    huge = "lorem ipsum dolor sit amet " * 1200  # about 6,000 tokens, under the body limit
    response = post(server, {"messages": [{"role": "user", "content": huge}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "context" in error["message"]


def _cancelled_after(server: RunningServer) -> list[int]:
    return [int(n) for n in re.findall(r"generation cancelled after (\d+) tokens", server.log())]


def _assert_engine_freed(server: RunningServer, cancels_before: int) -> None:
    # The abandoned request would run for ~3000 tokens (40 s or more here); the server
    # log says the engine stopped working for the client that left, and how many
    # tokens it had produced by then; a short request is served after it.
    quick = post(server, {"messages": [{"role": "user", "content": "Hi"}],
                          "max_completion_tokens": 3})  # fmt: skip
    assert quick.status_code == 200
    cancels = _cancelled_after(server)
    assert len(cancels) == cancels_before + 1
    assert cancels[-1] < 1500


def test_disconnected_stream_stops_its_generation(server: RunningServer) -> None:
    before = len(_cancelled_after(server))
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", server.base_url + URL, headers={"api-key": server.api_key},
        json={"model": "mimo-v2-flash", **LONG, "stream": True},
    ) as response:  # fmt: skip
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received >= 10:
                break  # leave the stream open no longer: closing it disconnects
    _assert_engine_freed(server, before)


def test_disconnected_non_streaming_request_stops_its_generation(server: RunningServer) -> None:
    before = len(_cancelled_after(server))
    with pytest.raises(httpx.ReadTimeout):
        post(server, LONG, timeout=2)
    _assert_engine_freed(server, before)


async def test_many_concurrent_clients_all_get_their_answer(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120,
                                 headers={"api-key": server.api_key}) as client:  # fmt: skip

        async def ask(i: int) -> httpx.Response:
            body = {"model": "mimo-v2-flash", "max_completion_tokens": 8, "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": f"Say the number {i}."}]}  # fmt: skip
            return await client.post(URL, json=body)

        responses = await asyncio.gather(*(ask(i) for i in range(8)))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        if i % 2 == 0:
            events, done = parse_sse(response.text)
            assert done and events[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
        else:
            assert response.json()["usage"]["completion_tokens"] <= 8


def test_ignore_eos_generates_exactly_the_requested_tokens(server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_completion_tokens": 40,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    data = post(server, body).json()
    assert data["usage"]["completion_tokens"] == 40
    assert data["choices"][0]["finish_reason"] == "length"


def test_usage_ledger_records_requests(server: RunningServer) -> None:
    post(server, {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3})
    key_id = server.api_key[5:17]

    def mine() -> list[list[str]]:  # the ledger writes in batches, every half second
        result = subprocess.run(
            cli("--home", str(server.home), "usage"), capture_output=True, text=True, check=True
        )
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return [row for row in rows if row[0] == key_id and row[1] == "mimo-v2-flash"]

    until_sync(lambda: bool(mine()), "the request reached the ledger")
    assert int(mine()[0][2]) >= 1 and int(mine()[0][4]) >= 1


def test_metrics_show_the_kv_pool_once_per_engine(server: RunningServer) -> None:
    """Cells used, cached and free add up to the pool (16,384 cells: --n-ctx 4096 is
    below the pool's floor); what a finished request computed stays cached. The model
    ids served by the same weights share one engine: one series, not one per id."""
    post(server, {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3})
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    pattern = r'^mimoserve:kv_cache_cells\{model="([^"]+)",state="(\w+)"\} (\S+)$'
    cells = {(m[1], m[2]): float(m[3]) for m in re.finditer(pattern, text, re.MULTILINE)}
    models = {model for model, _ in cells}
    assert len(models) == 1, cells
    (model,) = models
    assert sum(cells[model, state] for state in ("used", "cached", "free")) == 16_384
    assert cells[model, "cached"] > 0
    running = re.findall(r'^mimoserve:num_requests_running\{model="([^"]+)"\}', text, re.MULTILINE)
    # One series per engine: the language model once, whichever ids (and the omni id's
    # cascade) it serves; the speech engines each once.
    assert sorted(running) == sorted([model, "mimo-v2.5-tts", "mimo-v2.5-asr"])
