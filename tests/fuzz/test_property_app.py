"""Property-based: whatever arrives, the app answers in the contract's shape, never a 5xx
other than 503 with Retry-After, and keeps serving (fake backend, in process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.registry import ModelRegistry
from mimoserve.store.sqlite import SqliteDatabase
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend, fake_app
from tests.fuzz.strategies import (
    anthropic_bodies,
    chat_bodies,
    encoded,
    header_values,
    raw_bodies,
    responses_bodies,
)

URL = "/v1/chat/completions"
MODELS = [entry.id for entry in ModelRegistry.from_toml(REGISTRY).entries()]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    home: Path = tmp_path_factory.mktemp("prop")
    database = SqliteDatabase(home / "db.sqlite")
    keys = KeyStore(database)
    secret = keys.create("prop").secret
    app = fake_app(Settings(home=home, max_body_bytes=64 * 1024), database, ScriptedBackend())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, secret


def assert_contract(response: Any) -> None:
    status = response.status_code
    assert status < 500 or (status == 503 and response.headers.get("retry-after")), (
        status, response.text[:500])  # fmt: skip
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def assert_still_serving(client: TestClient, key: str) -> None:
    response = client.post(URL, headers={"api-key": key},
                           json={"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert (
        response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "ok"
    )


@SETTINGS
@given(body=chat_bodies(MODELS))
def test_generated_chat_bodies(app_client: tuple[TestClient, str], body: dict[str, Any]) -> None:
    client, key = app_client
    assert_contract(client.post(URL, headers={"api-key": key}, content=encoded(body)))


@SETTINGS
@given(raw=raw_bodies)
def test_raw_bytes(app_client: tuple[TestClient, str], raw: bytes) -> None:
    client, key = app_client
    assert_contract(client.post(URL, headers={"api-key": key, "content-type": "application/json"},
                                content=raw))  # fmt: skip


@SETTINGS
@given(
    key=st.one_of(st.none(), header_values),
    bearer=st.one_of(st.none(), header_values),
    content_type=st.one_of(st.none(), header_values, st.just("application/json; charset=x")),
    path=st.sampled_from(
        [
            URL,
            "/v1/models",
            "/v1/models/mimo-v2-flash",
            "/v1/models/%00",
            "/admin/keys",
            "/ready",
            "/nope",
        ]
    ),
)
def test_generated_headers_and_routes(
    app_client: tuple[TestClient, str], key: str | None, bearer: str | None,
    content_type: str | None, path: str,
) -> None:  # fmt: skip
    client, _ = app_client
    headers = {name.encode(): value.encode("latin-1") for name, value in (
        ("api-key", key), ("authorization", None if bearer is None else f"Bearer {bearer}"),
        ("content-type", content_type)) if value is not None}  # fmt: skip
    body = encoded({"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]})
    method = "POST" if path in (URL,) else "GET"
    response = client.request(
        method, path, headers=headers, content=body if method == "POST" else None
    )
    if path not in ("/ready",) and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        assert_contract(response)
    assert response.status_code != 500


def test_still_serving_after_the_fuzzing(app_client: tuple[TestClient, str]) -> None:
    client, key = app_client
    assert_still_serving(client, key)


@SETTINGS
@given(body=anthropic_bodies(MODELS))
def test_generated_anthropic_bodies(
    app_client: tuple[TestClient, str], body: dict[str, Any]
) -> None:
    client, key = app_client
    response = client.post(
        "/v1/messages?beta=true", headers={"x-api-key": key}, content=encoded(body)
    )
    status = response.status_code
    assert status < 500 or (status == 503 and response.headers.get("retry-after")), response.text[
        :500
    ]
    if status != 200:
        data = response.json()
        assert data["type"] == "error" and data["error"]["type"] and data["error"]["message"]


@SETTINGS
@given(body=responses_bodies(MODELS))
def test_generated_responses_bodies(
    app_client: tuple[TestClient, str], body: dict[str, Any]
) -> None:
    client, key = app_client
    assert_contract(client.post("/v1/responses", headers={"api-key": key}, content=encoded(body)))
