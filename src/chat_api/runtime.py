"""What the app holds while it runs (`Runtime`), and how it is opened and closed.

`open_runtime` runs in the lifespan: the database (migrated), the usage
ledger's writer, Redis when configured, the meter, the key store and the
upstream client. Everything is pushed onto an exit stack, which closes it in
reverse order at shutdown: open streams get a moment to finish their
cleanup, queued limit corrections are applied, the ledger is written out,
and only then do Redis and the database close. The app keeps the result in
one place, `app.state.runtime`, which routes read through
`routes.deps.runtime_of`.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from chat_api.auth import Guard
from chat_api.calls import CallResult
from chat_api.catalog import Catalog
from chat_api.config import Settings
from chat_api.engine import Engine
from chat_api.limits.admission import KeyMeter
from chat_api.limits.budgets import Budgets, MemoryBudgets, RedisBudgets
from chat_api.limits.counters import Counter, MemoryCounter, RedisCounter
from chat_api.limits.epoch import Epoch
from chat_api.limits.in_flight import Holds, InFlight, MemoryInFlight, RedisInFlight
from chat_api.limits.leases import RedisLeases
from chat_api.limits.shared_admission import SharedAdmission
from chat_api.metrics import Metrics
from chat_api.middleware import cors_summary
from chat_api.providers import build_provider
from chat_api.providers.probe import UpstreamProbe
from chat_api.store.database import migrate, open_engine
from chat_api.store.keycache import KeyCache, KeySetVersion
from chat_api.store.keys import KeyStore
from chat_api.store.ledger import Ledger
from chat_api.store.owners import OwnerStore
from chat_api.store.shared import Reachability, open_redis

log = logging.getLogger("chat_api")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(slots=True, frozen=True, eq=False)
class Runtime:
    """Everything a route, a dependency or a probe reads from the running app."""

    settings: Settings
    metrics: Metrics
    engine: Engine  # the catalog, the provider and the meter hang off it
    guard: Guard | None  # None when keys are off
    keys: KeyStore
    owners: OwnerStore
    ledger: Ledger
    database: AsyncEngine
    redis: Redis | None
    upstream_probe: UpstreamProbe  # what `/ready` asks of the upstream


async def open_runtime(
    settings: Settings, catalog: Catalog, metrics: Metrics, stack: AsyncExitStack
) -> Runtime:
    """Open what the app holds, each pushed onto `stack` to be closed at shutdown."""
    database = open_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    stack.push_async_callback(database.dispose)
    if settings.migrate_on_start:
        await migrate(database)
    ledger = Ledger(
        database,
        flush_interval=settings.ledger_flush_interval,
        batch_size=settings.ledger_batch_size,
        read_timeout=settings.database_timeout,
    )
    ledger.start()
    stack.push_async_callback(ledger.close)

    redis: Redis | None = None
    counter: Counter = MemoryCounter()
    budgets: Budgets = MemoryBudgets()
    in_flight: InFlight = MemoryInFlight()
    leases: RedisLeases | None = None
    shared: SharedAdmission | None = None
    version = KeySetVersion(None, prefix=settings.redis_prefix)
    if settings.redis_url:
        redis = open_redis(settings.redis_url)
        stack.push_async_callback(redis.aclose)
        reach = Reachability(redis)  # one "Redis is away" for everything below
        stack.push_async_callback(reach.close)
        prefix, replicas = settings.redis_prefix, settings.replicas
        holds = Holds(redis, seconds=settings.lease_seconds)
        stack.push_async_callback(holds.close)  # after the last settlements, before Redis
        # Long enough for every replica's renewer to notice that Redis lost its data.
        epoch = Epoch(redis, prefix=prefix, grace=holds.check_every * 1.5 + 0.5)
        leases = RedisLeases(
            redis,
            prefix=prefix,
            holds=holds,
            write_rows=ledger.write_now,
            reap_every=settings.reaper_interval,
            epoch=epoch,
            replicas=replicas,
        )
        leases.start()
        stack.push_async_callback(leases.close)
        counter = RedisCounter(redis, prefix=prefix, replicas=replicas, reach=reach)
        budgets = RedisBudgets(redis, prefix=prefix, leases=leases, replicas=replicas, reach=reach)
        in_flight = RedisInFlight(redis, prefix=prefix, replicas=replicas, holds=holds, reach=reach)
        version = KeySetVersion(redis, prefix=prefix, reach=reach)
        shared = SharedAdmission(
            redis,
            version_key=version.key,
            counter=counter,
            in_flight=in_flight,
            budgets=budgets,
            leases=leases,
        )
        stack.push_async_callback(shared.close)  # after the last settlements, before Redis

    def record(result: CallResult, row: dict[str, Any]) -> None:
        ledger.add(row)
        metrics.call_done(result, row["cost_usd"])

    meter = KeyMeter(
        counter,
        budgets,
        in_flight,
        record,
        ledger.spent,
        default_max_in_flight=settings.max_in_flight,
        leases=leases,
        shared=shared,
    )
    ledger.on_written = meter.rows_written
    # At the end, in this order: the corrections of finished calls, the last rows (while
    # Redis is still open: committed rows free their calls' leases there), those frees.
    stack.push_async_callback(meter.stop)
    stack.push_async_callback(ledger.close)  # also registered above, for a failed start
    stack.push_async_callback(meter.stop)

    provider = build_provider(settings)
    if provider is not None:
        stack.push_async_callback(provider.aclose)
    else:
        log.warning(
            "No OpenAI key is set: chat answers 503. Set OPENAI_API_KEY_CYB_SEC, "
            "or CHAT_API_DEMO=1 for the demo model."
        )
    engine = Engine(settings, catalog, provider, meter, streams_changed=metrics.open_streams.inc)
    stack.push_async_callback(_let_streams_finish, engine)
    # Whole answers whose clients left are read to their end (and billed) first.
    stack.push_async_callback(engine.drain, settings.shutdown_grace)
    keys = KeyStore(database, timeout=settings.database_timeout, version=version)
    owners = OwnerStore(database, timeout=settings.database_timeout)
    stack.push_async_callback(owners.drain)  # before the database closes
    guard = Guard(settings, KeyCache(keys, version), counter) if settings.keys_enabled else None
    if guard is not None:
        meter.recheck = guard.recheck
    if not settings.keys_enabled and settings.has_upstream_key and settings.host not in LOOPBACK:
        log.warning(
            "Anyone who can reach %s:%s can spend your OpenAI key: set CHAT_API_MASTER_KEY "
            "to require keys.",
            settings.host,
            settings.port,
        )
    log.info(cors_summary(settings.allowed_origins, settings.keys_enabled))
    log.info(
        "started",
        extra={
            "provider": provider.name if provider else None,
            "keys": settings.keys_enabled,
            "redis": redis is not None,
            "database": database.dialect.name,
        },
    )
    return Runtime(
        settings=settings,
        metrics=metrics,
        engine=engine,
        guard=guard,
        keys=keys,
        owners=owners,
        ledger=ledger,
        database=database,
        redis=redis,
        upstream_probe=UpstreamProbe.of(settings),
    )


async def _let_streams_finish(engine: Engine) -> None:
    """Streams the server cancelled at shutdown still close upstream and settle: wait for that."""
    for _ in range(30):
        if engine.open_streams <= 0:
            return
        await asyncio.sleep(0.1)
