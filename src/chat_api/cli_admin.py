"""`chat-api keys|usage|db`: managing keys and reading usage from the command line.

These talk to the database named by `CHAT_API_DATABASE_URL` directly, so they
work whether or not the service is running. A revocation is announced
through `CHAT_API_REDIS_URL` when it is set, and running replicas refuse the
key from their very next request; without Redis they do within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from chat_api.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# The storage modules pull in SQLAlchemy, Alembic and the OpenAI SDK: they are
# imported inside each command, so `chat-api serve` starts (or fails) fast.

Loader = Callable[[], Settings]
_T = TypeVar("_T")


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
    if isinstance(value, float):  # dollars, already as exact as they are kept: shown in full
        return format(Decimal(repr(value)).normalize(), "f")
    if isinstance(value, list):
        return ",".join(map(str, value)) or "all"
    return str(value)


# Where `chat-api keys create` takes each field of a key.
_FLAG_FOR_FIELD = {
    "name": "--name",
    "models": "--models",
    "rpm": "--rpm",
    "tpm": "--tpm",
    "budget_usd": "--budget",
    "budget_period": "--period",
    "expires_in_days": "--days",
}

KEYS_OFF_WARNING = (
    "chat-api: warning: keys are not checked until CHAT_API_MASTER_KEY is set; "
    "until then the service answers every request, with or without a key."
)


def _flag_error(exc: ValidationError) -> str:
    """The first problem with a new key's fields, named by its flag."""
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{_FLAG_FOR_FIELD.get(field, field)}: {message[:1].lower()}{message[1:]}."


def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.store.keys import KeySpec, KeyStore

    try:
        spec = KeySpec(
            name=args.name,
            models=[m.strip() for m in (args.models or "").split(",") if m.strip()],
            rpm=args.rpm,
            tpm=args.tpm,
            max_in_flight=args.max_in_flight,
            budget_usd=args.budget,
            budget_period=args.period,
            expires_in_days=args.days,
        )
    except ValidationError as exc:
        raise SystemExit(f"chat-api: {_flag_error(exc)}") from None
    for model in spec.models:
        if model not in settings.models:
            raise SystemExit(f"chat-api: --models: the model '{model}' is not in CHAT_API_MODELS.")

    async def work(engine: AsyncEngine) -> int:
        record, secret = await KeyStore(engine).create(spec)
        print(f"Created key {record.id} ({record.name}).")
        print(f"Secret (shown only now, keep it safe): {secret}")
        if not settings.keys_enabled:
            print(KEYS_OFF_WARNING, file=sys.stderr)
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
    "max_in_flight",
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


def _refusing(parse: Callable[[str], _T], expected: str) -> Callable[[str], _T]:
    """An argparse type: what `parse` cannot take is refused as "expected <expected>"."""

    def convert(value: str) -> _T:
        try:
            return parse(value)
        except (ValueError, ArithmeticError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None

    return convert


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """A flag's type: a whole number from `low` (up to `high`)."""

    def number(value: str) -> int:
        parsed = int(value)
        if parsed < low or (high is not None and parsed > high):
            raise ValueError(value)
        return parsed

    span = f"from {low} to {high}" if high is not None else f"of {low} or more"
    return _refusing(number, f"a whole number {span}")


def _amount(value: str) -> Decimal:
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(value)
    return amount


def _day(value: str) -> datetime:
    from chat_api.errors import ChatAPIError
    from chat_api.routes.usage import parse_day

    try:
        day = parse_day(value, "date")
    except ChatAPIError:
        raise ValueError(value) from None
    assert day is not None
    return day


_dollars = _refusing(_amount, "a number of dollars, like 5 or 2.50")
_days = _refusing(float, "a number of days, like 30 or 0.5")
_date = _refusing(_day, "a date like 2026-11-30 or 2026-11-30T12:00")


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    from chat_api.store.ledger import Ledger

    async def work(engine: AsyncEngine) -> int:
        ledger = Ledger(engine, flush_interval=1, batch_size=1)
        summary = await ledger.summary(
            key_id=args.key,
            all_keys=args.key is None,
            model=args.model,
            since=args.since,
            until=args.until,
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
    create.add_argument("--rpm", type=whole_number(1), help="requests per minute")
    create.add_argument("--tpm", type=whole_number(1), help="tokens per minute")
    create.add_argument(
        "--max-in-flight",
        type=whole_number(1),
        help="calls in progress at once (default: the server's)",
    )
    create.add_argument("--budget", type=_dollars, help="budget in US dollars, e.g. 5 or 2.50")
    create.add_argument(
        "--period",
        choices=["daily", "monthly", "total"],
        help="when the budget renews (default: total, never)",
    )
    create.add_argument("--days", type=_days, help="the key expires after this many days")
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
    usage.add_argument("--since", type=_date, help="from this day, e.g. 2026-11-01")
    usage.add_argument("--until", type=_date, help="before this day")
    usage.set_defaults(handler=bind(_usage))

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or upgrade the schema").set_defaults(
        handler=bind(_db_upgrade)
    )
