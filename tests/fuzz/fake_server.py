"""`python -m tests.fuzz.fake_server HOME PORT`: the real app and uvicorn, with the scripted
fake backend instead of a model, for fuzzing the HTTP surface from another process."""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.store.sqlite import SqliteDatabase
from tests.fake_backend import ScriptedBackend, fake_app


def main() -> None:
    home, port = Path(sys.argv[1]), int(sys.argv[2])
    settings = Settings(home=home, port=port, max_body_bytes=256 * 1024)
    database = SqliteDatabase(home / "mimoserve.db")
    keys = KeyStore(database)
    print(keys.create("fuzz").secret, flush=True)
    print(AdminCredential(database).ensure(), flush=True)
    app = fake_app(settings, database, ScriptedBackend(), speech=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
