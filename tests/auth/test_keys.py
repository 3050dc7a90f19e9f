from __future__ import annotations

import sqlite3
from pathlib import Path

from mimoserve.auth.keys import KeyStore
from mimoserve.store.sqlite import MIGRATIONS, Database


def test_key_is_shown_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    db_path = tmp_path / "k.db"
    store = KeyStore(Database(db_path))
    issued = store.create("laptop")
    assert issued.secret.startswith(issued.info.prefix)
    assert store.authenticate(issued.secret) is not None
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert issued.secret.encode() not in raw
    secret_part = issued.secret.split("_", 1)[1].encode()
    assert secret_part not in raw
    columns = [row[1] for row in sqlite3.connect(db_path).execute("PRAGMA table_info(api_keys)")]
    assert "key_hash" in columns and "key" not in columns


def test_listing_shows_name_prefix_and_last_use(keys: KeyStore) -> None:
    issued = keys.create("ci")
    [info] = [k for k in keys.list() if k.id == issued.info.id]
    assert (info.name, info.prefix, info.last_used_at) == ("ci", issued.info.prefix, None)
    keys.authenticate(issued.secret)
    [info] = [k for k in keys.list() if k.id == issued.info.id]
    assert info.last_used_at is not None and info.last_used_at >= info.created_at


def test_wrong_secret_with_a_real_id_is_refused(keys: KeyStore) -> None:
    issued = keys.create("a")
    other = keys.create("b")
    forged = issued.secret.split("_")[0] + "_" + other.secret.split("_", 1)[1]
    assert keys.authenticate(forged) is None
    assert keys.authenticate("") is None
    assert keys.authenticate("mimo-zz_" + "a" * 43) is None


def test_revocation(keys: KeyStore) -> None:
    issued = keys.create("old")
    assert keys.revoke(issued.info.id)
    assert keys.authenticate(issued.secret) is None
    assert not keys.revoke(issued.info.id), "a second revoke reports nothing to do"
    assert keys.count_active() == 0


def test_keys_survive_reopening_and_migrations_run_once(tmp_path: Path) -> None:
    issued = KeyStore(Database(tmp_path / "k.db")).create("persist")
    reopened = KeyStore(Database(tmp_path / "k.db"))
    assert reopened.authenticate(issued.secret) is not None
    conn = sqlite3.connect(tmp_path / "k.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
