"""Opening the database and bringing its schema up to date.

SQLite (the default, a file in the working directory) gets WAL mode and a
long busy timeout, so a reader or a briefly locked file never fails a
request: ledger writes wait and retry. PostgreSQL is used through asyncpg,
with a pool of `CHAT_API_DATABASE_POOL_SIZE` connections (plus
`CHAT_API_DATABASE_MAX_OVERFLOW` more at busy moments) per process.

Reads a client waits for go through `answering`, which gives up after
`CHAT_API_DATABASE_TIMEOUT` seconds with a 503 and `Retry-After`: a hung
database never holds requests for the length of its stall.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from chat_api.clock import utcnow as utcnow
from chat_api.errors import ServiceUnavailable

SQLITE_BUSY_MS = 30_000
_PG_MIGRATION_LOCK = 4_242_001
RETRY_AFTER = "5"
T = TypeVar("T")


def open_engine(url: str, *, pool_size: int = 10, max_overflow: int = 20) -> AsyncEngine:
    """An async engine for `url` (sqlite+aiosqlite:// or postgresql+asyncpg://)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
    )


async def answering(seconds: float | None, failure: str, work: Awaitable[T]) -> T:
    """`work` on the database, for a client who waits: a 503 saying `failure` if it fails or
    takes longer than `seconds` (None: no limit, for the command line).

    The work runs in a task of its own, so giving up waits for nothing: a
    stalled query's cleanup (closing its connection over a silent network)
    goes on in the background instead of holding the client.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except (SQLAlchemyError, OSError):  # TimeoutError is an OSError
        if not task.done():
            task.cancel()
            task.add_done_callback(_forget)
        raise ServiceUnavailable(
            f"{failure} right now (the database is not answering). Try again shortly.",
            code="database_unavailable",
            headers={"Retry-After": RETRY_AFTER},
        ) from None
    except asyncio.CancelledError:  # the client left: so does the work
        task.cancel()
        task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: abandoned work fails quietly


def normalize_url(url: str) -> str:
    """Accept the plain forms people paste (postgres://, sqlite:///) and pick async drivers."""
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("chat_api") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together take turns; the later ones find nothing to do.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
    command.upgrade(_alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Create or upgrade the schema to the newest migration."""
    for attempt in range(3):
        try:
            async with engine.begin() as connection:
                await connection.run_sync(_upgrade)
            return
        except Exception:
            if attempt == 2:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))  # another worker was migrating


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
