"""Prices, costs and budgets through the API: 402 on every door, the admin API, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore
from tests.api.registry_app import admin, key_id, serving
from tests.fake_backend import ScriptedBackend

PRICED = """
currency = "EUR"
[models.mimo-v2-flash]
weights = "fake-weights"
price = { input = 2.0, cached_input = 0.5, output = 8.0 }
[models.free]
weights = "fake-weights"
"""
CHAT = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 10}  # fmt: skip


@pytest.fixture
async def served(
    settings: Settings, database: Database, keys: KeyStore, backend: ScriptedBackend,
    api_key: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, UsageLedger]]:  # fmt: skip
    async with serving(PRICED, settings, database, keys, backend, api_key) as (client, ledger, _):
        yield client, ledger


async def put_budget(
    client: httpx.AsyncClient, token: str, scope: str, owner: str, **body: Any
) -> dict[str, Any]:
    response = await client.put(f"/admin/budgets/{scope}/{owner}", json=body,
                                headers=admin(token))  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_every_record_carries_its_cost_and_the_admin_sees_spend(
    served: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend, admin_token: str,
    database: Database, api_key: str,
) -> None:  # fmt: skip
    client, ledger = served
    # 1,000 prompt tokens (400 cached) and 3 completion tokens, priced per million:
    # 600 x 2.0 + 400 x 0.5 + 3 x 8.0 = 1,424 micros.
    backend.enqueue(["a", "b", "c"], prompt_tokens=1000, cached_tokens=400)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    backend.enqueue(["a"], prompt_tokens=1000)
    free = {**CHAT, "model": "free"}
    assert (await client.post("/v1/chat/completions", json=free)).status_code == 200
    await ledger.flush()
    records = SqlUsageStore(database).records()
    assert [(r.model, r.cost_micros) for r in records] == [("mimo-v2-flash", 1424), ("free", 0)]

    rows = (await client.get("/admin/usage", headers=admin(admin_token))).json()
    priced = next(r for r in rows if r["model"] == "mimo-v2-flash")
    assert priced["cost"] == pytest.approx(0.001424) and priced["currency"] == "EUR"
    series = (await client.get("/admin/usage/series", headers=admin(admin_token))).json()
    assert sum(p["cost"] for p in series) == pytest.approx(0.001424)
    listed = (await client.get("/admin/keys", headers=admin(admin_token))).json()
    mine = next(k for k in listed if k["id"] == key_id(api_key))
    assert mine["spend_this_month"] == {"tokens": 2004, "cost": pytest.approx(0.001424),
                                        "currency": "EUR"}  # fmt: skip
    assert mine["budget"] is None


async def test_a_spent_token_budget_answers_402_on_every_door(
    served: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend, admin_token: str,
    api_key: str, database: Database,
) -> None:  # fmt: skip
    client, ledger = served
    view = await put_budget(client, admin_token, "key", key_id(api_key), unit="tokens",
                            amount=100, period="day")  # fmt: skip
    assert view["remaining"] == 100 and view["currency"] is None
    backend.enqueue(["x"] * 5, prompt_tokens=95)  # 100 tokens: the budget is spent
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    refused = await client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "budget" in error["message"]
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert streamed.status_code == 402  # refused before the stream starts
    anthropic = await client.post("/v1/messages", json={
        "model": "mimo-v2-flash", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert anthropic.status_code == 402
    assert anthropic.json()["error"]["type"] == "billing_error"
    responses = await client.post("/v1/responses", json={"model": "mimo-v2-flash", "input": "hi"})
    assert responses.status_code == 402
    assert responses.json()["error"]["code"] == "insufficient_quota"

    await ledger.flush()
    statuses = [r.status for r in SqlUsageStore(database).records()]
    assert statuses == [200, 402, 402, 402, 402]  # refusals are in the ledger too
    metrics = (await client.get("/metrics")).text
    assert 'mimoserve:budget_refusals_total{model="mimo-v2-flash"} 4.0' in metrics
    assert 'mimoserve:budgets_over_soft_threshold{scope="key"} 1.0' in metrics
    # Nothing in the open /metrics names an account or a key.
    assert key_id(api_key) not in metrics and "owner=" not in metrics


async def test_a_money_budget_settles_to_the_real_cost_and_reset_restarts_it(
    served: tuple[httpx.AsyncClient, UsageLedger], backend: ScriptedBackend, admin_token: str,
    keys: KeyStore,
) -> None:  # fmt: skip
    client, _ = served
    account = keys.create_account("team")
    team_key = keys.create("t", account_id=account.id).secret
    as_team = {"api-key": team_key}
    # Reserving: about (body size / 3) prompt tokens x 2.0 + 10 x 8.0 micros; far less is used.
    view = await put_budget(client, admin_token, "account", account.id, unit="money",
                            amount=0.0005, period="month", soft_percent=50)  # fmt: skip
    assert view["amount"] == pytest.approx(0.0005) and view["currency"] == "EUR"
    for _ in range(2):  # each costs 100 x 2.0 + 1 x 8.0 = 208 micros
        backend.enqueue(["a"], prompt_tokens=100)
        response = await client.post("/v1/chat/completions", json=CHAT, headers=as_team)
        assert response.status_code == 200
    # 84 micros are left; the next request may spend its prompt estimate x 2.0 plus its
    # whole max_completion_tokens (10 x 8.0): that does not fit, so it is refused rather
    # than admitted to overspend (it used to be, and the period closed at 624 of 500).
    backend.enqueue(["a"], prompt_tokens=100)
    third = await client.post("/v1/chat/completions", json=CHAT, headers=as_team)
    assert third.status_code == 402
    status = (await client.get(f"/admin/budgets/account/{account.id}",
                               headers=admin(admin_token))).json()  # fmt: skip
    assert status["spent"] == pytest.approx(0.000416)  # settled to the real cost
    assert status["reserved"] == 0 and status["remaining"] == pytest.approx(0.000084)
    assert status["over_soft"]
    backend.scripts.clear()
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=as_team)
    assert refused.status_code == 402

    reset = await client.post(f"/admin/budgets/account/{account.id}/reset",
                              headers=admin(admin_token))  # fmt: skip
    assert reset.status_code == 200 and reset.json()["spent"] == 0
    backend.enqueue(["a"], prompt_tokens=100)
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers=as_team)
    ).status_code == 200
    # Raising the budget keeps the period's spend; removing it lifts the cap.
    raised = await put_budget(client, admin_token, "account", account.id, unit="money",
                              amount=1, period="month")  # fmt: skip
    assert raised["spent"] == pytest.approx(0.000208)
    removed = await client.delete(
        f"/admin/budgets/account/{account.id}", headers=admin(admin_token)
    )
    assert removed.status_code == 204
    assert (await client.get("/admin/budgets", headers=admin(admin_token))).json() == []


async def test_budget_admin_refuses_bad_input(
    served: tuple[httpx.AsyncClient, UsageLedger], admin_token: str, api_key: str
) -> None:
    client, _ = served
    bad = [
        ("key", key_id(api_key), {"unit": "tokens", "amount": 10.5}),
        ("key", key_id(api_key), {"unit": "tokens", "amount": 0}),
        ("key", key_id(api_key), {"unit": "coins", "amount": 10}),
        ("key", key_id(api_key), {"unit": "money", "amount": 1, "period": "week"}),
        ("key", key_id(api_key), {"unit": "money", "amount": 1e-9}),
        ("key", key_id(api_key), {"unit": "money", "amount": 1e10}),
        ("key", key_id(api_key), {"unit": "money", "amount": 1, "soft_percent": 0}),
        ("team", "x", {"unit": "tokens", "amount": 10}),
    ]
    for scope, owner, body in bad:
        response = await client.put(f"/admin/budgets/{scope}/{owner}", json=body,
                                    headers=admin(admin_token))  # fmt: skip
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    missing = await client.put("/admin/budgets/key/000000000000", json={"unit": "tokens",
                               "amount": 10}, headers=admin(admin_token))  # fmt: skip
    assert missing.status_code == 404
    assert (await client.post("/admin/budgets/key/nobody/reset",
                              headers=admin(admin_token))).status_code == 404  # fmt: skip
    assert (await client.put(f"/admin/budgets/key/{key_id(api_key)}",
                             json={"unit": "tokens", "amount": 10})).status_code == 401  # fmt: skip
