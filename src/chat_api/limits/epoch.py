"""Noticing that Redis lost its data (a restart without persistence, a flush).

An empty Redis must not read as "nothing spent": the `epoch` key holds the
time it was written, by whichever replica found it missing first. A
replica that sees a different epoch from the one it knew knows Redis lost
its data, and puts back what only it knows: its calls' reservations and
leases (`RedisLeases.recover`), its holds, its rate counts. Budgets
rebuilt from the ledger wait until every replica had time to notice
(`settle_in`), so the rebuilt total holds the calls in flight too.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from chat_api import clock


class Epoch:
    def __init__(self, redis: Redis, *, prefix: str, grace: float) -> None:
        self._redis = redis
        self.key = f"{prefix}epoch"
        self.grace = grace  # how long every replica may take to notice

    async def current(self) -> str:
        """The epoch, written now if Redis has none (it lost its data, or is new)."""
        value = await self._redis.get(self.key)
        if value is None:
            await self._redis.set(self.key, repr(clock.now()), nx=True)
            value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def settle_in(self, value: str) -> None:
        """Wait until replicas had time to notice an epoch this young."""
        wait = float(value) + self.grace - clock.now()
        if wait > 0:
            await asyncio.sleep(wait)


class Seen:
    """One consumer's view of the epoch: whether it changed since last looked."""

    def __init__(self, epoch: Epoch) -> None:
        self.epoch = epoch
        self.value: str | None = None

    async def changed(self) -> bool:
        value = await self.epoch.current()
        old, self.value = self.value, value
        return old is not None and old != value
