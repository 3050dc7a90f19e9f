"""The `mimoserve` command: serve | chat | keys | accounts | budgets | admin-token | models |
usage."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mimoserve.administration import Administration, NewKey
from mimoserve.api.request_id import configure_logging
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import DEFAULT_ACCOUNT, ConflictError, IssuedKey, KeyStore
from mimoserve.billing.budgets import (
    PERIODS,
    Budget,
    BudgetStore,
    Scope,
    Unit,
    month_start,
)
from mimoserve.billing.prices import as_money
from mimoserve.billing.service import BudgetStatus
from mimoserve.config import Settings
from mimoserve.errors import MimoError
from mimoserve.limits.policy import Limits
from mimoserve.weights.catalog import CATALOG
from mimoserve.weights.store import WeightsError, WeightsStore


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for field in Settings.model_fields:
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # Flags that contradict each other (or the environment's MIMOSERVE_*): one line
        # each and exit 2, as argparse does for a flag it rejects, not a traceback.
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            print(f"mimoserve: {where + ': ' if where else ''}{error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _announce_key(issued: IssuedKey) -> None:
    print(
        "\nCreated API key 'default' (shown only this once; store it now):\n\n"
        f"    {issued.secret}\n",
        flush=True,
    )


def _announce_admin(token: str) -> None:
    print(
        "Created the admin token for /admin and the dashboard (shown only this once):\n\n"
        f"    {token}\n",
        flush=True,
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mimoserve.server import build_server_app

    settings = _settings(args)
    configure_logging(settings.log_format)
    try:
        app = build_server_app(settings, _announce_key, _announce_admin)
    except WeightsError as exc:
        print(f"mimoserve: {exc}", file=sys.stderr)
        return 1
    _freeze_startup_heap()
    print(f"mimoserve listening on http://{settings.host}:{settings.port}/v1", flush=True)
    # No access log by default: the usage ledger already records every request, and a
    # log line per request cost ~5 % of a relay's CPU (measured with py-spy).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log, log_config=None)  # fmt: skip
    return 0


def _freeze_startup_heap() -> None:
    """Moves what start-up built (modules, the app, the engines: ~100,000 objects) out of
    the cyclic collector's reach. It lives as long as the process, yet every full
    collection walked all of it: 50 ms with the engine's thread stalled, measured on an
    agent's first request after its prompt was read (a 31-token answer 4 % slower)."""
    gc.collect()
    gc.freeze()


def cmd_chat(args: argparse.Namespace) -> int:
    from mimoserve.chat_cli import run

    return run(args.url, args.key, args.model, args.system, args.thinking, args.question,
               args.speak, args.speech_model, args.voice)  # fmt: skip


def cmd_accounts(args: argparse.Namespace) -> int:
    keys = KeyStore(_settings(args).open_database())
    if args.accounts_command == "create":
        try:
            account = keys.create_account(args.name, Limits(args.rpm, args.tpm))
        except ConflictError as exc:
            print(f"mimoserve: {exc}", file=sys.stderr)
            return 1
        print(f"created account {account.id} ({account.name})")
    else:
        print(f"{'ID':14} {'NAME':20} {'RPM':>8} {'TPM':>10}")
        for a in keys.accounts():
            rpm, tpm = a.limits.rpm or "-", a.limits.tpm or "-"
            print(f"{a.id:14} {a.name:20} {rpm:>8} {tpm:>10}")
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    token = AdminCredential(_settings(args).open_database()).rotate()
    print(f"New admin token (the old one no longer works; shown only once):\n{token}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    keys = KeyStore(_settings(args).open_database())
    if args.keys_command == "create":
        new = NewKey(args.name, args.account, args.expires_in_days,
                     args.models.split(",") if args.models else None,
                     Limits(args.rpm, args.tpm, args.max_concurrent))  # fmt: skip
        try:
            issued = _administration(args, keys).create_key(new)
        except MimoError as exc:
            print(f"mimoserve: {exc.message}", file=sys.stderr)
            return 1
        print(f"Created key {issued.info.prefix}… named {issued.info.name!r} (shown only once):")
        print(issued.secret)
    elif args.keys_command == "list":
        from mimoserve.store.usage import SqlUsageStore

        now = time.time()
        database = keys.database
        statuses = _budget_statuses(args, BudgetStore(database))
        month = month_start(now)
        spent = SqlUsageStore(database).spend_per_key(month)
        currency = _currency(args)
        print(f"{'ID':14} {'NAME':20} {'ACCOUNT':14} {'PREFIX':15} {'CREATED':20} "
              f"{'LAST USED':20} {'STATUS':8} {'TOKENS (MONTH)':>14} "
              f"{'COST (' + currency + ')':>12} BUDGET LEFT")  # fmt: skip
        for info in keys.list():
            status = "active"
            if info.revoked_at:
                status = "revoked"
            elif info.expires_at is not None and info.expires_at <= now:
                status = "expired"
            created, used = _when(info.created_at), _when(info.last_used_at)
            month_spend = spent.get(info.id)
            tokens, cost = (month_spend.tokens, month_spend.cost_micros) if month_spend else (0, 0)
            left = "-"
            if (period := statuses.get(("key", info.id))) is not None:
                budget = period.budget
                left = _budget_amount(budget, period.remaining)
                left += " tokens" if budget.unit == "tokens" else f" {currency}"
            print(f"{info.id:14} {info.name:20} {info.account_id:14} {info.prefix:15} "
                  f"{created:20} {used:20} {status:8} {tokens:>14} "
                  f"{as_money(cost):>12.6f} {left}")  # fmt: skip
    elif args.keys_command == "revoke":
        if not keys.revoke(args.key_id):
            print(f"no active key with id {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    store = WeightsStore(_settings(args).weights_dir)
    if args.models_command == "list":
        for item in store.list():
            state = "installed" if item.installed else "not installed"
            size_mb = item.spec.size / 1e6
            print(f"{item.spec.name:30} {size_mb:8.1f} MB  {state:14} {item.spec.description}")
            if item.installed:
                print(f"{'':30} {item.path}")
        return 0
    spec = CATALOG.get(args.name)
    if spec is None:
        print(f"unknown weights {args.name!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    try:
        path = store.resolve(spec.name)
    except WeightsError as exc:
        print(f"mimoserve: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from mimoserve.store.usage import SqlUsageStore

    store = SqlUsageStore(_settings(args).open_database())
    since = time.time() - args.hours * 3600
    currency = _currency(args)
    columns = ("KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "REASONING", "CACHED",
               f"COST ({currency})")  # fmt: skip
    line = "{:14} {:20} {:>9} {:>10} {:>11} {:>10} {:>10} {:>12}"
    print(line.format(*columns))
    for row in store.totals(since):
        values = (row.key_id, row.model, row.requests, row.prompt_tokens,
                  row.completion_tokens, row.reasoning_tokens, row.cached_tokens,
                  f"{as_money(row.cost_micros):.6f}")  # fmt: skip
        print(line.format(*values))
    return 0


def _currency(args: argparse.Namespace) -> str:
    from mimoserve.registry import ModelRegistry

    return ModelRegistry.load(_settings(args).registry_file).currency


def _administration(args: argparse.Namespace, keys: KeyStore) -> Administration:
    from mimoserve.registry import ModelRegistry

    served = [entry.id for entry in ModelRegistry.load(_settings(args).registry_file).entries()]
    return Administration(keys, BudgetStore(keys.database), served)


def _budget_statuses(
    args: argparse.Namespace, store: BudgetStore
) -> dict[tuple[str, str], BudgetStatus]:
    """Every budget's period as the running servers count it: with `--redis-url`, what
    requests in flight reserved is counted too (the same figure `/admin` shows); without,
    those reservations live in the server's memory and only settled use is known here."""
    import asyncio

    from mimoserve.billing.keeper import BudgetKeeper, LocalBudgetKeeper
    from mimoserve.billing.redis_keeper import RedisBudgetKeeper
    from mimoserve.billing.service import Budgets

    url = _settings(args).redis_url

    async def read() -> list[BudgetStatus]:
        keeper: BudgetKeeper = (
            RedisBudgetKeeper(url, store.spent_since) if url
            else LocalBudgetKeeper(store.spent_since)
        )  # fmt: skip
        try:
            return await Budgets(store, keeper, local_reads=True).statuses()
        finally:
            await keeper.close()

    return {(s.budget.scope, s.budget.owner): s for s in asyncio.run(read())}


def _budget_amount(budget: Budget, micros_or_tokens: int) -> str:
    return str(micros_or_tokens) if budget.unit == "tokens" else f"{as_money(micros_or_tokens):.6f}"


def cmd_budgets(args: argparse.Namespace) -> int:
    """Budgets live in the database: a running server sees a change within a second."""
    database = _settings(args).open_database()
    store, keys = BudgetStore(database), KeyStore(database)
    if args.budgets_command == "list":
        currency = _currency(args)
        print(f"{'SCOPE':8} {'OWNER':14} {'UNIT':12} {'PERIOD':7} {'AMOUNT':>16} "
              f"{'SPENT':>16} {'LEFT':>16} SOFT")  # fmt: skip
        for status in _budget_statuses(args, store).values():
            budget, spent = status.budget, status.spend.spent
            shown_unit = "tokens" if budget.unit == "tokens" else currency
            flag = "over" if budget.over_soft(spent) else f"{budget.soft_percent}%"
            amounts = (budget.amount, spent, status.remaining)
            shown = " ".join(f"{_budget_amount(budget, n):>16}" for n in amounts)
            head = f"{budget.scope:8} {budget.owner:14} {shown_unit:12} {budget.period:7}"
            print(f"{head} {shown} {flag}")
        return 0
    scope: Scope = "account" if args.account else "key"
    owner = args.account or args.key
    if args.budgets_command == "set":
        unit: Unit = "tokens" if args.tokens is not None else "money"
        amount = args.tokens if args.tokens is not None else args.money
        try:
            _administration(args, keys).set_budget(
                scope, owner, unit, amount, args.period, args.soft_percent
            )
        except MimoError as exc:
            print(f"mimoserve: {exc.message}", file=sys.stderr)
            return 1 if exc.status_code == 404 else 2
        print(f"budget set for {scope} {owner}")
    elif args.budgets_command == "reset":
        if store.reset(scope, owner) is None:
            print(f"no budget for {scope} {owner!r}", file=sys.stderr)
            return 1
        print(f"budget of {scope} {owner} counts from now")
    elif args.budgets_command == "remove":
        if not store.remove(scope, owner):
            print(f"no budget for {scope} {owner!r}", file=sys.stderr)
            return 1
        print(f"budget of {scope} {owner} removed")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimoserve", description=__doc__)
    parser.add_argument("--home", type=Path, help="data folder (default ~/.mimoserve)")
    parser.add_argument("--models-dir", type=Path, help="weights folder (default <home>/models)")
    parser.add_argument("--database-url", help="postgresql://... (default: SQLite in <home>)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the API server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--registry-file", type=Path, help="model registry TOML")
    serve.add_argument("--weights", help="serve every model id from these weights (name or path)")
    serve.add_argument("--no-speech", dest="speech", action="store_false", default=None,
                       help="leave out the speech models (about 330 MiB less memory)")
    serve.add_argument("--n-ctx", type=int, help="longest request, prompt and completion, in "
                       "tokens (default: the model's trained context)")  # fmt: skip
    serve.add_argument("--kv-cells", type=int, help="KV pool shared by all requests, in tokens "
                       "(default: max(n-ctx, 16384))")  # fmt: skip
    serve.add_argument("--kv-type", choices=["f16", "q8_0"],
                       help="KV cache precision (default f16; q8_0 halves its memory)")  # fmt: skip
    serve.add_argument("--flash-attn", choices=["on", "off"],
                       help="llama.cpp's flash attention (default on; off: cheaper "
                       "speculation at long contexts, slower prompts; f16 KV only)")  # fmt: skip
    serve.add_argument("--kv-disk-bytes", type=int, help="cap on prompts' KV cells kept on "
                       "disk under <home>/kv-cache, reloaded instead of recomputed, across "
                       "restarts too (default 8 GiB; 0: no disk or host tier)")  # fmt: skip
    serve.add_argument("--kv-host-bytes", type=int, help="of those, the most recently used "
                       "kept in memory as well (default 1 GiB)")  # fmt: skip
    serve.add_argument("--n-threads", type=int, help="llama.cpp threads (default: all cores)")
    serve.add_argument("--n-parallel", type=int, help="requests decoded together (default 4)")
    serve.add_argument("--n-batch", type=int, help="tokens decoded per step (default 512)")
    serve.add_argument("--max-queue", type=int, help="waiting requests before 503 (default 16)")
    serve.add_argument("--spec-max-draft", type=int, help="speculative decoding: most tokens "
                       "guessed per sequence and step (default and most 127; 0: off)")  # fmt: skip
    serve.add_argument("--stream-write-timeout-s", type=float, help="end a stream whose client "
                       "reads nothing for this long (default 60)")  # fmt: skip
    serve.add_argument("--access-log", action="store_true", default=None,
                       help="log every request (the usage ledger records them anyway)")  # fmt: skip
    serve.add_argument("--opentelemetry", action="store_true", default=None,
                       help="FastAPI OpenTelemetry (exporters from OTEL_* variables)")  # fmt: skip
    serve.add_argument("--redis-url", help="redis://... for rate limits shared by replicas")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (default 1 MiB)")
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines (default text)")
    serve.add_argument("--fleet-routing", choices=["cache", "least-outstanding"],
                       help="pick upstream replicas by cached prefix within a load bound "
                       "(default) or by least outstanding requests")  # fmt: skip
    serve.add_argument("--media-url-allow", help="internal hosts/networks (a,10.0.0.0/8) that "
                       "relayed media URLs may name (default: public addresses only)")  # fmt: skip
    serve.set_defaults(handler=cmd_serve)

    chat = commands.add_parser("chat", help="talk to a model from the terminal")
    chat.add_argument("question", nargs="?", help="ask once and exit (or pipe text on stdin)")
    chat.add_argument("--url", help="server (default http://127.0.0.1:8000, or $MIMO_BASE_URL)")
    chat.add_argument("--key", help="API key (default $MIMO_API_KEY)")
    chat.add_argument("--model", default="mimo-v2-flash")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--thinking", choices=["on", "off"], help="reasoning (default: the model's)")
    chat.add_argument("--speak", type=Path, metavar="FILE",
                      help="also save each answer as speech (.wav, .mp3 or .pcm)")
    chat.add_argument("--speech-model", default="mimo-v2.5-tts", help="the model that speaks")
    chat.add_argument("--voice", default="mimo_default", help="the voice it speaks with")
    chat.set_defaults(handler=cmd_chat)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--account", default=DEFAULT_ACCOUNT, help="account id (default: default)")
    create.add_argument("--expires-in-days", type=float, help="the key stops working after this")
    create.add_argument("--models", help="comma-separated model ids this key may use")
    create.add_argument("--rpm", type=int, help="the key's own requests/min per model")
    create.add_argument("--tpm", type=int, help="the key's own tokens/min per model")
    create.add_argument("--max-concurrent", type=int, help="requests in flight for this key")
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)

    accounts = commands.add_parser("accounts", help="manage accounts (keys belong to one)")
    account_commands = accounts.add_subparsers(dest="accounts_command", required=True)
    new_account = account_commands.add_parser("create", help="create an account")
    new_account.add_argument("name")
    new_account.add_argument("--rpm", type=int, help="requests/min per model, all keys together")
    new_account.add_argument("--tpm", type=int, help="tokens/min per model, all keys together")
    account_commands.add_parser("list", help="list accounts and their limits")
    accounts.set_defaults(handler=cmd_accounts)

    budgets = commands.add_parser("budgets", help="token or money budgets per account and key")
    budget_commands = budgets.add_subparsers(dest="budgets_command", required=True)
    budget_commands.add_parser("list", help="budgets, what their period spent and what is left")
    for name, text in (
        ("set", "create or change a budget (spend so far still counts)"),
        ("reset", "count the budget from now"),
        ("remove", "drop the budget"),
    ):
        command = budget_commands.add_parser(name, help=text)
        owner = command.add_mutually_exclusive_group(required=True)
        owner.add_argument("--account", help="an account id")
        owner.add_argument("--key", help="a key id")
        if name == "set":
            amount = command.add_mutually_exclusive_group(required=True)
            amount.add_argument("--tokens", type=int, help="prompt + completion tokens")
            amount.add_argument("--money", type=float, help="in the registry's currency")
            command.add_argument(
                "--period", choices=PERIODS, default="month",
                help="when the count starts again (UTC; default month)",
            )  # fmt: skip
            command.add_argument(
                "--soft-percent", type=int, default=80,
                help="flag the budget past this share (default 80)",
            )  # fmt: skip
    budgets.set_defaults(handler=cmd_budgets)

    admin = commands.add_parser("admin-token", help="replace the admin token and print it once")
    admin.set_defaults(handler=cmd_admin_token)

    models = commands.add_parser("models", help="manage model weights")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="download, assemble and verify weights")
    pull.add_argument("name", choices=sorted(CATALOG))
    model_commands.add_parser("list", help="show known and installed weights")
    models.set_defaults(handler=cmd_models)

    usage = commands.add_parser("usage", help="token usage per key and model")
    usage.add_argument("--hours", type=float, default=24.0, help="look back this far (default 24)")
    usage.set_defaults(handler=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
