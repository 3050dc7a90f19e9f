from __future__ import annotations

import re
from pathlib import Path

import pytest

from mimoserve.auth.admin import AdminCredential
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


def test_accounts_keys_with_policies_and_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path)]
    assert main([*home, "accounts", "create", "research", "--rpm", "30"]) == 0
    account_id = capsys.readouterr().out.split()[2]
    assert main([*home, "accounts", "create", "research"]) == 1, "names are unique"
    capsys.readouterr()
    assert main([*home, "accounts", "list"]) == 0
    assert "research" in capsys.readouterr().out
    assert main([*home, "keys", "create", "--name", "bot", "--account", account_id,
                 "--models", "mimo-v2-pro", "--expires-in-days", "1", "--max-concurrent", "2"]) == 0  # fmt: skip
    secret = re.search(r"mimo-[0-9a-f]{12}_\S+", capsys.readouterr().out)
    assert secret is not None
    principal = KeyStore(Database(tmp_path / "mimoserve.db")).authenticate(secret.group(0))
    assert principal is not None
    assert principal.account_id == account_id
    assert principal.allowed_models == frozenset({"mimo-v2-pro"})
    assert principal.account_limits.rpm == 30 and principal.key_limits.max_concurrent == 2
    assert main([*home, "keys", "create", "--name", "x", "--account", "nope"]) == 1
    assert main([*home, "admin-token"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert AdminCredential(Database(tmp_path / "mimoserve.db")).verify(token)
