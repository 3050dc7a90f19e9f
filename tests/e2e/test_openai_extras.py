"""The OpenAI extras on the embedded engine with the real small model: logprobs and
top_logprobs (OpenAI's shape, streamed and whole) and n > 1, through raw HTTP and the
openai SDK."""

from __future__ import annotations

import math
from typing import Any

import openai

from tests.api.sse_client import parse_sse
from tests.e2e.server import RunningServer
from tests.e2e.test_raw_http import post

BASE = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0,
        "max_completion_tokens": 24, "logprobs": True, "top_logprobs": 3}  # fmt: skip


def check_entries(entries: list[dict[str, Any]], rivals: int) -> None:
    assert entries
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert (
            entry["logprob"] <= 0
            and bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        )
        top = entry["top_logprobs"]
        assert len(top) == rivals
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-4
        # Greedy sampling takes the most likely token.
        assert entry["token"] == top[0]["token"]
        assert math.isclose(entry["logprob"], top[0]["logprob"], abs_tol=1e-5)


def test_whole_answer_carries_each_tokens_logprob(server: RunningServer) -> None:
    response = post(server, BASE)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    check_entries(entries, 3)
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    assert len(entries) == response.json()["usage"]["completion_tokens"] - (
        1 if choice["finish_reason"] == "stop" else 0  # the end-of-turn token is not text
    )
    plain = post(server, {**BASE, "logprobs": None, "top_logprobs": None}).json()["choices"][0]
    assert "logprobs" not in plain
    assert plain["message"]["content"] == choice["message"]["content"]


def test_streamed_logprobs_add_up_to_the_whole_answers(server: RunningServer) -> None:
    whole = post(server, BASE).json()["choices"][0]["logprobs"]["content"]
    events, done = parse_sse(post(server, {**BASE, "stream": True}).text)
    assert done
    streamed = [e for event in events if event["choices"]
                for e in (event["choices"][0].get("logprobs") or {}).get("content") or []]  # fmt: skip
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    for a, b in zip(streamed, whole, strict=True):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-3)


def test_logprobs_without_rivals_and_bad_values(server: RunningServer) -> None:
    alone = post(server, {**BASE, "top_logprobs": 0}).json()["choices"][0]["logprobs"]["content"]
    assert alone and all(e["top_logprobs"] == [] for e in alone)
    for bad in ({"top_logprobs": 21}, {"top_logprobs": -1}, {"logprobs": False},
                {"logprobs": "yes"}):  # fmt: skip
        response = post(server, {**BASE, **bad})
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_sdk_reads_them(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key)
    answer = client.chat.completions.create(
        model="mimo-v2-flash", messages=[{"role": "user", "content": "Name three colours."}],
        temperature=0,
        max_completion_tokens=12, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == answer.choices[0].message.content


def test_n_choices_from_the_real_engine(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key)
    one = client.chat.completions.create(
        model="mimo-v2-flash", messages=[{"role": "user", "content": "Say a word."}],
        max_completion_tokens=8, seed=11,
    )  # fmt: skip
    three = client.chat.completions.create(
        model="mimo-v2-flash", messages=[{"role": "user", "content": "Say a word."}],
        max_completion_tokens=8, seed=11, n=3, logprobs=True,
    )  # fmt: skip
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.logprobs and c.logprobs.content for c in three.choices)
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    # Completion tokens add up over the choices (each choice's text tokens, plus its
    # end-of-turn token when it stopped by itself).
    counted = 0
    for choice in three.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        counted += len(choice.logprobs.content) + int(choice.finish_reason == "stop")
    assert three.usage.completion_tokens == counted
    stream = client.chat.completions.create(
        model="mimo-v2-flash", messages=[{"role": "user", "content": "Say a word."}],
        max_completion_tokens=8, seed=11, n=2, stream=True,
    )  # fmt: skip
    indices = {choice.index for chunk in stream for choice in chunk.choices}
    assert indices == {0, 1}
