from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.registry import ModelRegistry
from mimoserve.store.base import Database
from mimoserve.store.postgres import PostgresDatabase
from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.fake_backend import ScriptedBackend
from tests.services import postgres_server, redis_server

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
    return SqliteDatabase(tmp_path / "mimoserve.db")


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
        usage=SqlUsageStore(database),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        headers={"api-key": api_key},
    ) as http:
        yield http


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    with postgres_server() as cluster:
        yield cluster.url


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the shared test cluster."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The same store tests run on both engines."""
    if request.param == "sqlite":
        db: Database = SqliteDatabase(tmp_path / "store.db")
    else:
        db = PostgresDatabase(request.getfixturevalue("postgres_url"))
    yield db
    db.close()


# ---- test tiers ------------------------------------------------------------------------
# The unit tier (`pytest -m unit`) is pure code and the app on the scripted backend: no
# subprocess, no database server, no browser, no model. Every other tier is named by
# what it needs; `.ci/run` runs the unit tier first, then the rest.
_SERVICE_FIXTURES = {"postgres_url", "postgres_server_url", "redis_url"}
_SERVICE_PARAMS = ("postgresql", "redis")
_TIER_BY_FOLDER = {"tests/e2e/": "real_model", "tests/fuzz/": "fuzz", "tests/web/": "browser"}
SLOW_TIERS = ("services", "browser", "fuzz", "load", "real_model", "slow")


def _needs_services(item: pytest.Item) -> bool:
    if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return any(isinstance(p, str) and p in _SERVICE_PARAMS for p in params)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path).replace("\\", "/")
        for folder, tier in _TIER_BY_FOLDER.items():
            if folder in path:
                item.add_marker(getattr(pytest.mark, tier))
        if _needs_services(item):
            item.add_marker(pytest.mark.services)
        if not any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.unit)
