"""`chat-api keys|usage|db`: managing keys and reading usage from the command line.

These talk to the database named by `CHAT_API_DATABASE_URL` directly, so they
work whether or not the service is running. A revocation is announced
through `CHAT_API_REDIS_URL` when it is set, and running replicas refuse the
key from their very next request; without Redis they do within a second.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from chat_api.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# The storage modules pull in SQLAlchemy, Alembic and the OpenAI SDK: they are
# imported inside each command, so `chat-api serve` starts (or fails) fast.

Loader = Callable[[], Settings]


def _run(settings: Settings, work: Callable[[AsyncEngine], Awaitable[int]]) -> int:
    from chat_api.store.database import migrate, open_engine

    async def main() -> int:
        engine = open_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
        )
        try:
            await migrate(engine)
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table, one row per line."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "all"
    return str(value)


def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.routes.schemas import describe
    from chat_api.store.keys import KeySpec, KeyStore

    try:
        budget = Decimal(args.budget) if args.budget is not None else None
        spec = KeySpec(
            name=args.name,
            models=[m.strip() for m in (args.models or "").split(",") if m.strip()],
            rpm=args.rpm,
            tpm=args.tpm,
            budget_usd=budget,
            budget_period=args.period,
            expires_in_days=args.days,
        )
    except InvalidOperation:
        raise SystemExit(
            "chat-api: --budget must be a number of dollars, like 5 or 2.50."
        ) from None
    except ValidationError as exc:
        raise SystemExit(f"chat-api: {describe(exc)}") from None
    for model in spec.models:
        if model not in settings.models:
            raise SystemExit(f"chat-api: the model '{model}' is not in CHAT_API_MODELS.")

    async def work(engine: AsyncEngine) -> int:
        record, secret = await KeyStore(engine).create(spec)
        print(f"Created key {record.id} ({record.name}).")
        print(f"Secret (shown only now, keep it safe): {secret}")
        return 0

    return _run(settings, work)


_KEY_COLUMNS = (
    "id",
    "name",
    "prefix",
    "status",
    "models",
    "rpm",
    "tpm",
    "budget_usd",
    "budget_period",
    "expires_at",
)


def _keys_list(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.store.keys import KeyStore

    async def work(engine: AsyncEngine) -> int:
        records = await KeyStore(engine).all()
        print(table([r.public() for r in records], _KEY_COLUMNS) if records else "No keys yet.")
        return 0

    return _run(settings, work)


def _keys_show(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.store.keys import KeyStore

    async def work(engine: AsyncEngine) -> int:
        record = await KeyStore(engine).get(args.id)
        if record is None:
            print(f"There is no key with id {args.id}.")
            return 1
        for name, value in record.public().items():
            print(f"{name:>14}: {_cell(value)}")
        return 0

    return _run(settings, work)


def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.errors import ChangeNotAnnounced
    from chat_api.store.keycache import KeySetVersion
    from chat_api.store.keys import KeyStore
    from chat_api.store.shared import open_redis

    async def work(engine: AsyncEngine) -> int:
        redis = open_redis(settings.redis_url) if settings.redis_url else None
        version = KeySetVersion(redis, prefix=settings.redis_prefix)
        try:
            record = await KeyStore(engine, version=version).revoke(args.id)
        except ChangeNotAnnounced as exc:
            print(exc.message)
            return 1
        finally:
            if redis is not None:
                await redis.aclose()
        if record is None:
            print(f"There is no key with id {args.id}.")
            return 1
        print(f"Revoked key {record.id} ({record.name}).")
        return 0

    return _run(settings, work)


def _day(value: str | None) -> datetime | None:
    from chat_api.errors import ChatAPIError
    from chat_api.routes.usage import parse_day

    try:
        return parse_day(value, "date")
    except ChatAPIError as exc:
        raise SystemExit(f"chat-api: {exc.message}") from None


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.store.ledger import Ledger

    async def work(engine: AsyncEngine) -> int:
        ledger = Ledger(engine, flush_interval=1, batch_size=1)
        summary = await ledger.summary(
            key_id=args.key,
            all_keys=args.key is None,
            model=args.model,
            since=_day(args.since),
            until=_day(args.until),
        )
        measures = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")
        print(table([summary["totals"]], measures))
        for title, column in (("by_key", "key_id"), ("by_model", "model"), ("by_day", "day")):
            if summary.get(title):
                print(f"\n{title.replace('_', ' ').capitalize()}:")
                print(table(summary[title], (column, *measures)))
        return 0

    return _run(settings, work)


def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    async def work(engine: AsyncEngine) -> int:
        print("The database schema is up to date.")
        return 0

    return _run(settings, work)


def add_commands(commands: Any, load: Loader) -> None:
    """Register `keys`, `usage` and `db` on the `chat-api` parser."""

    def bind(handler: Callable[[Settings, argparse.Namespace], int]) -> Callable[..., int]:
        return lambda args: handler(load(), args)

    keys = commands.add_parser("keys", help="create, list, show and revoke client keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a new client key")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--models", help="comma-separated models it may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--budget", help="budget in US dollars, e.g. 5 or 2.50")
    create.add_argument(
        "--period",
        choices=["daily", "monthly", "total"],
        help="when the budget renews (default: total, never)",
    )
    create.add_argument("--days", type=float, help="the key expires after this many days")
    create.set_defaults(handler=bind(_keys_create))
    key_commands.add_parser("list", help="every key, without secrets").set_defaults(
        handler=bind(_keys_list)
    )
    for name, handler, text in (
        ("show", _keys_show, "one key, without its secret"),
        ("revoke", _keys_revoke, "revoke a key at once"),
    ):
        sub = key_commands.add_parser(name, help=text)
        sub.add_argument("id", help="the key's id, like key_0123abcd...")
        sub.set_defaults(handler=bind(handler))

    usage = commands.add_parser("usage", help="who spent what, as tables")
    usage.add_argument("--key", help="only this key id")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--since", help="from this day, e.g. 2026-11-01")
    usage.add_argument("--until", help="before this day")
    usage.set_defaults(handler=bind(_usage))

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or upgrade the schema").set_defaults(
        handler=bind(_db_upgrade)
    )
