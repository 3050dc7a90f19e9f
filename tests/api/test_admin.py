"""The admin API: its own credential, accounts and keys, limits, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from mimoserve.app import create_app
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.registry import ModelRegistry
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend

CHAT = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 10}  # fmt: skip


def admin(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "api-key": ""}


async def create_account(client: httpx.AsyncClient, token: str, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/admin/accounts", json={"name": "team", **body}, headers=admin(token)
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def create_key(
    client: httpx.AsyncClient, token: str, account: str, **body: Any
) -> dict[str, Any]:
    response = await client.post(f"/admin/accounts/{account}/keys", json={"name": "k", **body},
                                 headers=admin(token))  # fmt: skip
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_admin_needs_the_admin_token_not_an_api_key(
    client: httpx.AsyncClient, admin_token: str, api_key: str
) -> None:
    assert (await client.get("/admin/accounts", headers={"api-key": ""})).status_code == 401
    ordinary = await client.get("/admin/accounts", headers=admin(api_key))
    assert ordinary.status_code == 401 and api_key not in ordinary.text
    assert (
        await client.get("/admin/accounts", headers=admin("mimo-admin-wrong"))
    ).status_code == 401
    assert (await client.get("/admin/accounts", headers=admin(admin_token))).status_code == 200


async def test_account_and_key_lifecycle(client: httpx.AsyncClient, admin_token: str) -> None:
    account = await create_account(client, admin_token, rpm=60)
    assert account["limits"] == {"rpm": 60, "tpm": None, "max_concurrent": None}
    created = await create_key(client, admin_token, account["id"])
    secret, info = created["key"], created["info"]
    assert secret.startswith(info["prefix"]) and info["account_id"] == account["id"]
    ok = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": secret})
    assert ok.status_code == 200
    listing = (await client.get("/admin/keys", params={"account_id": account["id"]},
                                headers=admin(admin_token))).json()  # fmt: skip
    assert [k["id"] for k in listing] == [info["id"]]
    assert secret not in str(listing) and "hash" not in str(listing)
    assert listing[0]["last_used_at"] is not None
    revoked = await client.delete(f"/admin/keys/{info['id']}", headers=admin(admin_token))
    assert revoked.status_code == 204
    refused = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": secret})
    assert refused.status_code == 401
    again = await client.delete(f"/admin/keys/{info['id']}", headers=admin(admin_token))
    assert again.status_code == 404


async def test_model_not_allowed_for_the_key_is_403(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    account = await create_account(client, admin_token)
    secret = (await create_key(client, admin_token, account["id"], allowed_models=["mimo-v2-pro"]))[
        "key"
    ]
    denied = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": secret})
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    allowed = await client.post("/v1/chat/completions", json={**CHAT, "model": "mimo-v2-pro"},
                                headers={"api-key": secret})  # fmt: skip
    assert allowed.status_code == 200


async def test_expired_key_is_refused(client: httpx.AsyncClient, keys: KeyStore) -> None:
    import time

    issued = keys.create("short-lived", expires_at=time.time() - 1)
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"api-key": issued.secret}
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "body"),
    [("/admin/accounts", {}), ("/admin/accounts", {"name": ""}), ("/admin/accounts", {"name": "x", "rpm": 0}),
     ("/admin/accounts", {"name": "x", "rpm": "ten"}), ("/admin/accounts", {"name": "x", "bogus": 1}),
     ("/admin/accounts/default/keys", {"name": "k", "allowed_models": ["no-such-model"]}),
     ("/admin/accounts/default/keys", {"name": "k", "expires_in_days": -1}),
     ("/admin/accounts/default/keys", {})],
)  # fmt: skip
async def test_malformed_admin_requests_are_400(
    client: httpx.AsyncClient, admin_token: str, path: str, body: dict[str, Any]
) -> None:
    response = await client.post(path, json=body, headers=admin(admin_token))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_admin_bad_json_duplicate_and_unknown_ids(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    headers = {**admin(admin_token), "content-type": "application/json"}
    assert (
        await client.post("/admin/accounts", content=b"{nope", headers=headers)
    ).status_code == 400
    await create_account(client, admin_token)
    dup = await client.post("/admin/accounts", json={"name": "team"}, headers=admin(admin_token))
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "name_taken"
    missing = await client.post(
        "/admin/accounts/nope/keys", json={"name": "k"}, headers=admin(admin_token)
    )
    assert missing.status_code == 404
    assert (await client.get("/admin/accounts/nope", headers=admin(admin_token))).status_code == 404


async def test_account_limit_is_shared_by_its_keys_and_answered_with_429(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    account = await create_account(client, admin_token, rpm=3)
    first = (await create_key(client, admin_token, account["id"]))["key"]
    second = (await create_key(client, admin_token, account["id"]))["key"]
    statuses = [
        (await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": key})).status_code
        for key in (first, second, first, second)
    ]
    assert statuses == [200, 200, 200, 429]
    refused = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": first})
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    patched = await client.patch(f"/admin/accounts/{account['id']}", json={"rpm": 100},
                                 headers=admin(admin_token))  # fmt: skip
    assert patched.json()["limits"]["rpm"] == 100
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": first})
    ).status_code == 200


async def test_counts_stay_exact_under_many_parallel_clients(
    client: httpx.AsyncClient, admin_token: str, backend: ScriptedBackend
) -> None:
    account = await create_account(client, admin_token, rpm=25)
    keys = [(await create_key(client, admin_token, account["id"]))["key"] for _ in range(4)]
    for _ in range(80):
        backend.enqueue(["a", "b"], delay_s=0.01)
    responses = await asyncio.gather(*(
        client.post("/v1/chat/completions", json=CHAT, headers={"api-key": keys[i % 4]})
        for i in range(80)
    ))  # fmt: skip
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 25 and statuses.count(429) == 55


async def test_concurrency_limit_per_key(
    client: httpx.AsyncClient, admin_token: str, backend: ScriptedBackend
) -> None:
    account = await create_account(client, admin_token)
    key = (await create_key(client, admin_token, account["id"], max_concurrent=2))["key"]
    for _ in range(6):
        backend.enqueue(["slow"] * 5, delay_s=0.05)
    responses = await asyncio.gather(*(
        client.post("/v1/chat/completions", json=CHAT, headers={"api-key": key}) for _ in range(6)
    ))  # fmt: skip
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert (
        await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": key})
    ).status_code == 200


async def test_usage_endpoint(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await client.get("/admin/usage", params={"hours": 1}, headers=admin(admin_token))
    assert response.status_code == 200 and isinstance(response.json(), list)
    bad = await client.get("/admin/usage", params={"hours": -3}, headers=admin(admin_token))
    assert bad.status_code == 400


async def test_store_outage_is_503_then_recovers(
    client: httpx.AsyncClient, keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mimoserve.store.base import StoreError
    from mimoserve.store.sqlite import Database

    def broken(self: Database):  # type: ignore[no-untyped-def]
        raise StoreError("sqlite: disk I/O error")

    monkeypatch.setattr(Database, "transaction", broken)
    monkeypatch.setattr(Database, "reading", broken)
    down = await client.post("/v1/chat/completions", json=CHAT)
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "store_unavailable" and "retry-after" in down.headers
    monkeypatch.undo()
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_rate_limit_store_outage_is_503_and_recorded(
    settings: Settings, keys: KeyStore, backend: ScriptedBackend, api_key: str
) -> None:
    from mimoserve.limits.redis_limiter import RedisRateLimiter
    from tests.services import free_port

    registry = ModelRegistry.from_toml(REGISTRY)
    recorded: list[UsageRecord] = []

    class Store:
        def insert_usage(self, records: Sequence[UsageRecord]) -> None:
            recorded.extend(records)

    ledger = UsageLedger(Store(), flush_interval_s=0.01)
    app = create_app(
        settings, registry=registry, backends={e.id: backend for e in registry.entries()},
        keys=keys, ledger=ledger,
        limiter=RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0"),  # nothing listens
    )  # fmt: skip
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t",
        headers={"Authorization": f"Bearer {api_key}"},
    ) as client:  # fmt: skip
        response = await client.post("/v1/chat/completions", json=CHAT)
        ready = await client.get("/ready")
    assert ready.status_code == 503 and ready.json()["limits"] == "unreachable"
    assert response.status_code == 503 and "retry-after" in response.headers
    assert response.json()["error"]["code"] == "store_unavailable"
    assert "redis" not in response.text and "127.0.0.1" not in response.text
    assert [r.status for r in recorded] == [503]
