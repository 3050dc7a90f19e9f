from __future__ import annotations

import re
from pathlib import Path

import pytest

from mimoserve.auth.keys import KeyStore
from mimoserve.cli import main
from mimoserve.server import ensure_first_key
from mimoserve.store.sqlite import Database


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path), "keys", "create", "--name", "alice"]) == 0
    secret = re.search(r"mimo-[0-9a-f]{12}_\S+", capsys.readouterr().out)
    assert secret is not None
    key_id = secret.group(0)[5:17]

    assert main(["--home", str(tmp_path), "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing
    assert secret.group(0) not in listing, "secrets are never listed"

    assert main(["--home", str(tmp_path), "keys", "revoke", key_id]) == 0
    assert main(["--home", str(tmp_path), "keys", "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["--home", str(tmp_path), "keys", "revoke", key_id]) == 1


def test_models_list_shows_the_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models-dir", str(tmp_path), "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in out and "not installed" in out


def test_first_start_issues_exactly_one_key(tmp_path: Path) -> None:
    keys = KeyStore(Database(tmp_path / "db"))
    announced: list[str] = []
    ensure_first_key(keys, lambda issued: announced.append(issued.secret))
    ensure_first_key(keys, lambda issued: announced.append(issued.secret))
    assert len(announced) == 1
    assert keys.authenticate(announced[0]) is not None
