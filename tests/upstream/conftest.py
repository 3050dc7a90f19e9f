from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from mimoserve.app import create_app
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.upstream.client import build_upstreams
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger
from mimoserve.registry import ModelRegistry
from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.services import uvicorn_in_thread


@dataclass
class Gateway:
    url: str
    key: str
    keys: KeyStore
    usage: SqlUsageStore
    app_state: object

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"api-key": self.key},
                            timeout=30, **options)  # type: ignore[arg-type]  # fmt: skip


@contextmanager
def running_gateway(tmp_path: Path, registry_toml: str, *,
                    health_interval_s: float = 0.2) -> Iterator[Gateway]:  # fmt: skip
    """A real mimoserve (uvicorn, 127.0.0.1) serving the registry's upstream models."""
    database = SqliteDatabase(tmp_path / "gw.db")
    keys, usage = KeyStore(database), SqlUsageStore(database)
    registry = ModelRegistry.from_toml(registry_toml)
    upstreams = build_upstreams(registry.entries())
    for model in upstreams.values():
        model._health_interval_s = health_interval_s
    app = create_app(
        Settings(home=tmp_path), registry=registry, backends={}, keys=keys,
        ledger=UsageLedger(usage, flush_interval_s=0.05), usage=usage, upstreams=upstreams,
    )  # fmt: skip
    try:
        with uvicorn_in_thread(app) as url:
            yield Gateway(url, keys.create("gw").secret, keys, usage, app.state)
    finally:
        database.close()


def registry_for(*urls: str, kind: str = "vllm", model_id: str = "mimo-v2-flash",
                 extra: str = "") -> str:  # fmt: skip
    replicas = "\n".join(
        f'[[models.{model_id}.upstreams]]\nurl = "{url}"\nkind = "{kind}"\n'
        'model = "XiaomiMiMo/MiMo-V2-Flash"\n'
        for url in urls
    )
    return f'[models.{model_id}]\nbackend = "upstream"\nupstream_timeout_s = 3\n{extra}\n{replicas}'
