"""The real app on the scripted backend with a registry of the test's own (prices,
parsers), its ledger writing every few milliseconds: for the budget and tenant tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger
from mimoserve.registry import ModelRegistry
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore
from tests.fake_backend import ScriptedBackend


def admin(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "api-key": ""}


def key_id(api_key: str) -> str:
    return api_key.split("_")[0].removeprefix("mimo-")


@asynccontextmanager
async def serving(
    registry_toml: str, settings: Settings, database: Database, keys: KeyStore,
    backend: ScriptedBackend, api_key: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore]]:  # fmt: skip
    registry = ModelRegistry.from_toml(registry_toml)
    usage = SqlUsageStore(database)
    ledger = UsageLedger(usage, flush_interval_s=0.01)
    app = create_app(settings, registry=registry, keys=keys, ledger=ledger, usage=usage,
                     admin=AdminCredential(database),
                     backends={e.id: backend for e in registry.entries()})  # fmt: skip
    ledger.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"api-key": api_key}) as client:  # fmt: skip
        yield client, ledger, usage
    await ledger.close()
