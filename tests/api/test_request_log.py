"""The admin's request log, the CSV export, and per-key limits changed after creation."""

from __future__ import annotations

import csv
import io
import time

import httpx

from mimoserve.auth.keys import KeyStore
from mimoserve.metering.ledger import UsageRecord
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore


def admin(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "api-key": ""}


def history(database: Database) -> list[UsageRecord]:
    now = time.time()
    records = [
        UsageRecord(key_id=f"k{i % 2}", model=("m-a", "m-b", "")[i % 3],
                    status=(200, 402, 429, 200, 500)[i % 5], prompt_tokens=i, completion_tokens=1,
                    cost_micros=i * 10, created_at=now - 100 + i, http_request_id=f"req-{i}",
                    request_id=f"chatcmpl-{i}", api=("chat.completions", "messages")[i % 2],
                    ttft_s=0.5 if i % 5 in (0, 3) else None, latency_s=1.25)
        for i in range(23)
    ]  # fmt: skip
    SqlUsageStore(database).insert_usage(records)
    return records


async def test_the_request_log_filters_and_pages_newest_first(
    client: httpx.AsyncClient, admin_token: str, database: Database
) -> None:
    records = history(database)
    seen: list[str] = []
    before = None
    while True:
        query = {"limit": 10} if before is None else {"limit": 10, "before": before}
        page = await client.get("/admin/requests", params=query, headers=admin(admin_token))
        body = page.json()
        seen += [r["request_id"] for r in body["data"]]
        before = body["next_before"]
        if before is None:
            break
    assert seen == [f"req-{i}" for i in reversed(range(23))]  # every one, newest first, once

    first = (await client.get("/admin/requests", params={"limit": 1},
                              headers=admin(admin_token))).json()["data"][0]  # fmt: skip
    latest = records[-1]
    assert first == {
        "row": first["row"], "time": latest.created_at, "key_id": "k0", "account_id": "default",
        "model": "m-b", "door": "chat.completions", "status": 429, "prompt_tokens": 22,
        "completion_tokens": 1, "reasoning_tokens": 0, "cached_tokens": 0, "ttft_s": None,
        "duration_s": 1.25, "cost": 0.00022, "finish_reason": None,
        "completion_id": "chatcmpl-22", "request_id": "req-22",
    }  # fmt: skip

    async def ids(**query: str) -> list[int]:
        response = await client.get("/admin/requests", params={**query, "limit": "200"},
                                    headers=admin(admin_token))  # fmt: skip
        assert response.status_code == 200, response.text
        return sorted(int(r["request_id"].removeprefix("req-")) for r in response.json()["data"])

    assert await ids(key_id="k1") == [i for i in range(23) if i % 2]
    assert await ids(model="m-b") == [i for i in range(23) if i % 3 == 1]
    assert await ids(status="402") == [i for i in range(23) if i % 5 == 1]
    assert await ids(status="errors") == [i for i in range(23) if i % 5 in (1, 2, 4)]
    assert await ids(key_id="k0", status="200", model="m-a") == [
        i for i in range(23) if i % 2 == 0 and i % 5 in (0, 3) and i % 3 == 0
    ]
    for bad in ({"status": "20"}, {"status": "ok"}, {"limit": "0"}, {"limit": "201"},
                {"before": "-1"}, {"hours": "0"}):  # fmt: skip
        response = await client.get("/admin/requests", params=bad, headers=admin(admin_token))
        assert response.status_code == 400, bad
    assert (await client.get("/admin/requests")).status_code == 401


async def test_usage_exports_as_csv(
    client: httpx.AsyncClient, admin_token: str, database: Database
) -> None:
    history(database)
    response = await client.get("/admin/usage.csv", headers=admin(admin_token))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="mimoserve-usage-' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 23
    assert rows[0]["request_id"] == "req-22" and rows[0]["status"] == "429"
    assert rows[0]["cost"] == "0.000220" and rows[0]["currency"] == "USD"
    assert rows[0]["time_utc"].endswith("Z") and rows[-1]["request_id"] == "req-0"
    assert {r["model"] for r in rows} == {"m-a", "m-b", ""}
    assert (await client.get("/admin/usage.csv")).status_code == 401


async def test_a_keys_own_limits_can_be_changed_and_cleared(
    client: httpx.AsyncClient, admin_token: str, keys: KeyStore
) -> None:
    issued = keys.create("worker")
    url = f"/admin/keys/{issued.info.id}"
    changed = await client.patch(url, json={"rpm": 1, "max_concurrent": 3},
                                 headers=admin(admin_token))  # fmt: skip
    assert changed.status_code == 200, changed.text
    assert changed.json()["limits"] == {"rpm": 1, "tpm": None, "max_concurrent": 3}
    chat = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}
    as_worker = {"api-key": issued.secret}
    assert (
        await client.post("/v1/chat/completions", json=chat, headers=as_worker)
    ).status_code == 200
    limited = await client.post("/v1/chat/completions", json=chat, headers=as_worker)
    assert limited.status_code == 429  # the new limit applies on the next request
    cleared = await client.patch(url, json={}, headers=admin(admin_token))
    assert cleared.json()["limits"] == {"rpm": None, "tpm": None, "max_concurrent": None}
    assert (
        await client.post("/v1/chat/completions", json=chat, headers=as_worker)
    ).status_code == 200
    for bad in ({"rpm": 0}, {"rpm": "5"}, {"burst": 3}):
        response = await client.patch(url, json=bad, headers=admin(admin_token))
        assert response.status_code == 400, bad
    missing = await client.patch("/admin/keys/nope", json={}, headers=admin(admin_token))
    assert missing.status_code == 404
