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


def test_budgets_set_list_reset_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mimoserve.billing.budgets import BudgetStore
    from mimoserve.metering.ledger import UsageRecord
    from mimoserve.store.sqlite import SqliteDatabase
    from mimoserve.store.usage import SqlUsageStore

    home = ["--home", str(tmp_path)]
    assert main([*home, "accounts", "create", "team"]) == 0
    account = capsys.readouterr().out.split()[2]
    assert main([*home, "budgets", "set", "--account", account, "--money", "2.5",
                 "--period", "day", "--soft-percent", "60"]) == 0  # fmt: skip
    assert main([*home, "budgets", "set", "--key", "nokey", "--tokens", "5"]) == 1
    assert main([*home, "budgets", "set", "--account", account, "--tokens", "0"]) == 2
    database = SqliteDatabase(tmp_path / "mimoserve.db")
    SqlUsageStore(database).insert_usage([
        UsageRecord(key_id="k", account_id=account, model="m", status=200, prompt_tokens=1,
                    completion_tokens=1, cost_micros=2_000_000),
    ])  # fmt: skip
    capsys.readouterr()
    assert main([*home, "budgets", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()[1].split()
    assert listed == ["account", account, "USD", "day", "2.500000", "2.000000", "0.500000", "over"]
    assert main([*home, "budgets", "reset", "--account", account]) == 0
    budget = BudgetStore(database).get("account", account)
    assert budget is not None and budget.reset_at > 0 and budget.amount == 2_500_000
    assert main([*home, "budgets", "remove", "--account", account]) == 0
    assert main([*home, "budgets", "remove", "--account", account]) == 1
    assert main([*home, "usage"]) == 0
    assert "COST (USD)" in capsys.readouterr().out


def test_keys_list_shows_month_spend_and_budget_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mimoserve.metering.ledger import UsageRecord
    from mimoserve.store.sqlite import SqliteDatabase
    from mimoserve.store.usage import SqlUsageStore

    home = ["--home", str(tmp_path)]
    assert main([*home, "keys", "create", "--name", "bob"]) == 0
    secret = re.search(r"mimo-([0-9a-f]{12})_\S+", capsys.readouterr().out)
    assert secret is not None
    key_id = secret.group(1)
    SqlUsageStore(SqliteDatabase(tmp_path / "mimoserve.db")).insert_usage([
        UsageRecord(key_id=key_id, model="m", status=200, prompt_tokens=30,
                    completion_tokens=12, cost_micros=1500),
    ])  # fmt: skip
    assert main([*home, "budgets", "set", "--key", key_id, "--tokens", "100"]) == 0
    capsys.readouterr()
    assert main([*home, "keys", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(key_id))
    assert row.split()[-5:] == ["active", "42", "0.001500", "58", "tokens"]


def test_the_cli_checks_what_the_admin_api_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One admin service behind both: a key may only name served models, and a money
    # budget below one micro of the currency is refused (both used to pass the CLI).
    home = ["--home", str(tmp_path)]
    assert main([*home, "keys", "create", "--name", "a", "--models", "no-such-model"]) == 1
    assert "Unknown models: no-such-model" in capsys.readouterr().err
    assert main([*home, "keys", "create", "--name", "b", "--models", "mimo-v2-flash"]) == 0
    key_id = re.search(r"mimo-([0-9a-f]{12})_", capsys.readouterr().out).group(1)  # type: ignore[union-attr]
    assert main([*home, "budgets", "set", "--key", key_id, "--money", "0.0000001"]) == 2
    assert "below one micro" in capsys.readouterr().err
    assert main([*home, "budgets", "set", "--key", "nobody", "--tokens", "10"]) == 1
    assert "No key with id 'nobody'" in capsys.readouterr().err


def test_budget_left_in_the_cli_counts_what_requests_in_flight_reserved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import asyncio
    import time

    from mimoserve.billing.budgets import BudgetStore
    from mimoserve.billing.keeper import Usage
    from mimoserve.billing.redis_keeper import RedisBudgetKeeper

    home = ["--home", str(tmp_path)]
    monkeypatch.setenv("MIMOSERVE_REDIS_URL", redis_url)
    assert main([*home, "keys", "create", "--name", "busy"]) == 0
    key_id = re.search(r"mimo-([0-9a-f]{12})_", capsys.readouterr().out).group(1)  # type: ignore[union-attr]
    assert main([*home, "budgets", "set", "--key", key_id, "--tokens", "1000"]) == 0
    store = BudgetStore(Database(tmp_path / "mimoserve.db"))
    budget = store.get("key", key_id)
    assert budget is not None

    async def hold() -> None:  # a server replica's request in flight, 400 tokens held
        keeper = RedisBudgetKeeper(redis_url, store.spent_since)
        await keeper.reserve([budget], Usage(400, 0), Usage(400, 0), time.time())
        await keeper.leases.close()  # leave the hold as a running replica would

    asyncio.run(hold())
    capsys.readouterr()
    assert main([*home, "keys", "list"]) == 0
    assert "600 tokens" in capsys.readouterr().out
    assert main([*home, "budgets", "list"]) == 0
    assert re.search(r"\b1000\s+0\s+600\b", capsys.readouterr().out)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--kv-type", "q8_0", "--flash-attn", "off"], "kv_type q8_0 needs flash_attn on"),
        (["--n-parallel", "32", "--n-batch", "16"], "n_batch (16) must be at least n_parallel"),
        (["--n-batch", "4"], "n_batch: Input should be greater than or equal to 16"),
    ],
)
def test_serve_flags_that_contradict_each_other_are_refused_in_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as exited:  # as argparse exits for a flag it rejects
        main(["--home", str(tmp_path), "serve", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "mimoserve.db").exists()  # refused before anything started


def test_flash_attention_is_on_unless_turned_off(tmp_path: Path) -> None:
    from mimoserve.cli import _parser, _settings

    assert _settings(_parser().parse_args(["serve"])).flash_attn == "on"
    off = _settings(_parser().parse_args(["serve", "--flash-attn", "off"]))
    assert off.flash_attn == "off" and off.kv_type == "f16"


def test_serve_takes_the_start_up_heap_out_of_the_collectors_walks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What start-up built lives as long as the process; every full collection walked it
    (50 ms with the engine's thread stalled, traced on an agent's request). By the time
    the server listens, it is frozen."""
    import gc

    import uvicorn

    import mimoserve.cli
    import mimoserve.server

    frozen_when_serving: list[int] = []
    monkeypatch.setattr(mimoserve.cli, "configure_logging", lambda fmt: None)  # the root's
    monkeypatch.setattr(mimoserve.server, "build_server_app", lambda *args: object())
    monkeypatch.setattr(
        uvicorn, "run", lambda *a, **k: frozen_when_serving.append(gc.get_freeze_count())
    )
    try:
        assert main(["--home", str(tmp_path), "serve"]) == 0
    finally:
        gc.unfreeze()
    assert frozen_when_serving and frozen_when_serving[0] > 10_000
