from __future__ import annotations

import httpx

from mimoserve.auth.keys import KeyStore

URL = "/v1/chat/completions"
BODY = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}


async def test_api_key_header_works(client: httpx.AsyncClient) -> None:
    assert (await client.post(URL, json=BODY)).status_code == 200


async def test_bearer_header_works(client: httpx.AsyncClient, api_key: str) -> None:
    response = await client.post(
        URL, json=BODY, headers={"api-key": "", "authorization": f"Bearer {api_key}"}
    )
    assert response.status_code == 200, response.text


async def test_missing_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=BODY, headers={"api-key": ""})
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "missing_api_key"


async def test_wrong_key_is_401_and_not_echoed(client: httpx.AsyncClient, api_key: str) -> None:
    forged = api_key[:-4] + "AAAA"
    response = await client.post(URL, json=BODY, headers={"api-key": forged})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert forged not in response.text


async def test_garbage_bearer_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL, json=BODY, headers={"api-key": "", "authorization": "Bearer nonsense"}
    )
    assert response.status_code == 401


async def test_revoked_key_is_refused_on_the_next_request(
    client: httpx.AsyncClient, keys: KeyStore, api_key: str
) -> None:
    assert (await client.post(URL, json=BODY)).status_code == 200
    assert keys.revoke(api_key.split("_")[0])
    assert (await client.post(URL, json=BODY)).status_code == 401


async def test_auth_is_checked_before_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, content=b"{bad json", headers={"api-key": "nope"})
    assert response.status_code == 401


async def test_models_endpoint_needs_a_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models", headers={"api-key": ""})).status_code == 401


async def test_health_needs_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health", headers={"api-key": ""})).json() == {"status": "ok"}
