"""The `mimoserve` command: serve | keys | models | usage."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mimoserve.auth.keys import IssuedKey, KeyStore
from mimoserve.config import Settings
from mimoserve.store.sqlite import Database
from mimoserve.weights.catalog import CATALOG
from mimoserve.weights.store import WeightsError, WeightsStore


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for field in Settings.model_fields:
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _announce_key(issued: IssuedKey) -> None:
    print(
        "\nCreated API key 'default' (shown only this once; store it now):\n\n"
        f"    {issued.secret}\n",
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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = build_server_app(settings, _announce_key)
    except WeightsError as exc:
        print(f"mimoserve: {exc}", file=sys.stderr)
        return 1
    print(f"mimoserve listening on http://{settings.host}:{settings.port}/v1", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    keys = KeyStore(Database(_settings(args).database_path))
    if args.keys_command == "create":
        issued = keys.create(args.name)
        print(f"Created key {issued.info.prefix}… named {issued.info.name!r} (shown only once):")
        print(issued.secret)
    elif args.keys_command == "list":
        print(f"{'ID':14} {'NAME':20} {'PREFIX':15} {'CREATED':20} {'LAST USED':20} STATUS")
        for info in keys.list():
            status = "revoked" if info.revoked_at else "active"
            print(f"{info.id:14} {info.name:20} {info.prefix:15} {_when(info.created_at):20} "
                  f"{_when(info.last_used_at):20} {status}")  # fmt: skip
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
    from mimoserve.store.usage import SqliteUsageStore

    store = SqliteUsageStore(Database(_settings(args).database_path))
    since = time.time() - args.hours * 3600
    columns = ("KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "REASONING", "CACHED")
    print("{:14} {:20} {:>9} {:>10} {:>11} {:>10} {:>10}".format(*columns))
    for row in store.totals(since):
        values = (row.key_id, row.model, row.requests, row.prompt_tokens,
                  row.completion_tokens, row.reasoning_tokens, row.cached_tokens)  # fmt: skip
        print("{:14} {:20} {:>9} {:>10} {:>11} {:>10} {:>10}".format(*values))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimoserve", description=__doc__)
    parser.add_argument("--home", type=Path, help="data folder (default ~/.mimoserve)")
    parser.add_argument("--models-dir", type=Path, help="weights folder (default <home>/models)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the API server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--registry-file", type=Path, help="model registry TOML")
    serve.add_argument("--weights", help="serve every model id from these weights (name or path)")
    serve.add_argument("--n-ctx", type=int, help="context window in tokens (default 4096)")
    serve.add_argument("--n-threads", type=int, help="llama.cpp threads (default: all cores)")
    serve.add_argument("--n-parallel", type=int, help="requests decoded together (default 4)")
    serve.add_argument("--max-queue", type=int, help="waiting requests before 503 (default 16)")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (default 1 MiB)")
    serve.set_defaults(handler=cmd_serve)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)

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
