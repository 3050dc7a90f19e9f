from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.registry import ModelRegistry
from mimoserve.store.sqlite import Database
from mimoserve.store.usage import SqliteUsageStore
from tests.fake_backend import ScriptedBackend

REGISTRY = """
[models.mimo-v2-flash]
weights = "fake-weights"
[models.mimo-v2-pro]
weights = "fake-weights"
bare_json_tool_calls = true
thinking_default = true
[models.mimo-xml]
weights = "fake-weights"
tool_parser = "mimo_xml"
thinking = "native"
"""


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database(tmp_path / "mimoserve.db")


@pytest.fixture
def keys(database: Database) -> KeyStore:
    return KeyStore(database)


@pytest.fixture
def admin_token(database: Database) -> str:
    token = AdminCredential(database).ensure()
    assert token is not None
    return token


@pytest.fixture
def api_key(keys: KeyStore) -> str:
    return keys.create("test").secret


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, max_body_bytes=64 * 1024)


@pytest.fixture
async def client(
    settings: Settings, database: Database, keys: KeyStore, backend: ScriptedBackend, api_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    registry = ModelRegistry.from_toml(REGISTRY)
    app = create_app(
        settings,
        registry=registry,
        backends={entry.id: backend for entry in registry.entries()},
        keys=keys,
        admin=AdminCredential(database),
        usage=SqliteUsageStore(database),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        headers={"api-key": api_key},
    ) as http:
        yield http
