"""Every response carries a request id; the id is in the request's usage record and logs."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from mimoserve.api.request_id import JsonFormatter, RequestIdFilter
from mimoserve.context import current_request_id
from tests.api.test_usage_records import BODY, URL, MemoryStore, metered, store  # noqa: F401 (fixtures)


async def test_every_answer_carries_an_id(client: httpx.AsyncClient) -> None:
    answers = [
        await client.post(URL, json=BODY),
        await client.post(URL, json={**BODY, "stream": True}),
        await client.post(URL, json={**BODY, "model": "nope"}),
        await client.post(URL, json=BODY, headers={"api-key": "wrong"}),
        await client.get("/no/such/route"),
        await client.get("/health"),
    ]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)


async def test_the_anthropic_door_also_says_request_id(client: httpx.AsyncClient) -> None:
    body = {
        "model": "mimo-v2-flash",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    answer = await client.post("/anthropic/v1/messages", json=body)
    assert answer.headers["request-id"] == answer.headers["x-request-id"]


@pytest.mark.parametrize(("given", "kept"), [
    ("trace-123.abc:9", True), ("x" * 128, True), ("x" * 129, False), ("bad id", False),
    ("ünï", False), ("", False),
])  # fmt: skip
async def test_a_sane_client_id_is_kept(client: httpx.AsyncClient, given: str, kept: bool) -> None:
    headers = {b"x-request-id": given.encode("utf-8")}
    answer = await client.post(URL, json=BODY, headers=headers)
    assert (answer.headers["x-request-id"] == given) is kept


async def test_the_id_is_in_the_usage_record(
    metered: tuple[httpx.AsyncClient, object],  # noqa: F811
    store: MemoryStore,  # noqa: F811
) -> None:
    client, ledger = metered
    await client.post(URL, json=BODY, headers={"x-request-id": "trace-7"})
    await client.post(URL, json={**BODY, "model": "nope"}, headers={"x-request-id": "trace-8"})
    await ledger.flush()  # type: ignore[attr-defined]
    assert [r.http_request_id for r in store.records] == ["trace-7", "trace-8"]


def test_log_lines_carry_the_id_as_text_and_json() -> None:
    record = logging.LogRecord(
        "mimoserve.x", logging.WARNING, __file__, 1, "engine %s", ("busy",), None
    )
    token = current_request_id.set("trace-9")
    try:
        RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    assert record.request_id == "trace-9"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-9" and line["message"] == "engine busy"
    assert line["level"] == "WARNING"
