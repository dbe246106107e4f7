"""Money budgets per key and period, in micro-dollars.

Before a call, `reserve` adds the call's worst-case cost to the running
total (spent plus everything reserved by calls still in flight) in one
atomic step, if and only if the total stays within the limit. After the
call, `adjust` swaps the reservation for the real cost. So however many
calls run at once, on however many replicas, what they can cost together
never passes the limit: each was let in only if its worst case fitted
beside every earlier one counted at its own worst case. (Only a call whose
upstream bill passed its worst case could break that, and the worst case
is built so that it cannot.) The running total starts from the ledger
(`seed`) the first time a key's period is seen. With Redis, a missing total
is not trusted as "nothing spent": if Redis lost its data, every replica
first adds back its calls in flight (`limits/epoch.py`).

`RedisBudgets` keeps totals in Redis for all replicas; when Redis cannot be
reached it fails closed (503), because money is not guessed.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_api.clock import utcnow as utcnow
from chat_api.errors import ServiceUnavailable
from chat_api.limits.leases import WRITE_LEASE
from chat_api.limits.shared_work import SharedWork
from chat_api.store.shared import Reachability

if TYPE_CHECKING:
    from chat_api.limits.leases import Lease, RedisLeases

Seed = Callable[[], Awaitable[int]]


TOTAL_RESETS_IN = 86_400.0  # what a total budget says of its reset (it never resets)


def period_bounds(period: str | None, now: datetime) -> tuple[str, datetime | None, float]:
    """(bucket name, start of the period, seconds until it resets)."""
    if period == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        return f"d{start:%Y%m%d}", start, (end - now).total_seconds()
    if period == "monthly":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + timedelta(days=days)
        return f"m{start:%Y%m}", start, (end - now).total_seconds()
    return "t", None, TOTAL_RESETS_IN


class Periods:
    """`period_bounds` at a clock reading, worked out once a period instead of once a call.

    A daily or monthly period is kept from its start to its end (clock
    readings, so a test's moved clock moves into the next one).
    """

    def __init__(self) -> None:
        self._known: dict[str | None, tuple[str, datetime | None, float, float]] = {}

    def bounds(self, period: str | None, now: float) -> tuple[str, datetime | None, float]:
        known = self._known.get(period)
        if known is None or not known[2] <= now < known[3]:
            bucket, start, reset_in = period_bounds(period, datetime.fromtimestamp(now, UTC))
            begins, ends = (start.timestamp(), now + reset_in) if start else (-math.inf, math.inf)
            known = self._known[period] = (bucket, start, begins, ends)
        bucket, start, _, ends = known
        return bucket, start, ends - now if start else TOTAL_RESETS_IN  # a total never renews


class Budgets(Protocol):
    async def reserve(
        self,
        key_id: str,
        bucket: str,
        amount: int,
        limit: int,
        seed: Seed,
        lease: Lease | None = None,
    ) -> tuple[bool, int]:
        """Reserve `amount` micro-dollars if the total stays within `limit`.

        Returns whether it was reserved, and the total before this call.
        With `lease`, the call's lease is written in the same step.
        """
        ...

    async def adjust(self, key_id: str, bucket: str, delta: int) -> None: ...

    async def used(self, key_id: str, bucket: str, seed: Seed) -> int: ...


class MemoryBudgets:
    def __init__(self) -> None:
        self._used: dict[tuple[str, str], int] = {}

    async def used(self, key_id: str, bucket: str, seed: Seed) -> int:
        key = (key_id, bucket)
        if key not in self._used:
            seeded = await seed()
            self._used.setdefault(key, seeded)  # another request may have seeded meanwhile
        return self._used[key]

    async def reserve(
        self,
        key_id: str,
        bucket: str,
        amount: int,
        limit: int,
        seed: Seed,
        lease: Lease | None = None,
    ) -> tuple[bool, int]:
        await self.used(key_id, bucket, seed)
        # No await from here on: check and take happen as one step.
        used = self._used[(key_id, bucket)]
        if used + amount > limit:
            return False, used
        self._used[(key_id, bucket)] = used + amount
        return True, used

    async def adjust(self, key_id: str, bucket: str, delta: int) -> None:
        key = (key_id, bucket)
        if key in self._used:
            self._used[key] += delta


# KEYS[budget, (lease, lease index)], ARGV[amount, limit, (lease arguments)]
_RESERVE = (
    WRITE_LEASE
    + """
local cur = redis.call('GET', KEYS[1])
if not cur then return {-1, 0} end
cur = tonumber(cur)
if cur + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, cur} end
redis.call('INCRBY', KEYS[1], ARGV[1])
if #KEYS > 1 then write_lease(KEYS[2], KEYS[3], ARGV, 3) end
return {1, cur}
"""
)

_UNAVAILABLE = "Budgets cannot be checked right now (the shared store is away). Try again shortly."


class RedisBudgets:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        leases: RedisLeases | None = None,
        replicas: int = 1,
        reach: Reachability,
    ) -> None:
        self._redis = redis
        self._reach = reach
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self.leases = leases
        self._replicas = replicas
        self._seeding = SharedWork()

    def key(self, key_id: str, bucket: str) -> str:
        return f"{self._prefix}budget:{key_id}:{bucket}"

    async def seed(self, key: str, seed: Seed) -> None:
        """Start a missing budget counter from the ledger; calls at the same moment share it."""
        await self._seeding.run(key, lambda: self._seed(key, seed))

    async def _seed(self, key: str, seed: Seed) -> None:
        if self.leases is not None:  # Redis may have lost its data: not "nothing spent"
            await self.leases.before_seed(self._replicas)
        value = await seed()
        await self._redis.set(key, value, nx=True, ex=60 * 60 * 24 * 40)

    def _away(self) -> ServiceUnavailable:
        return ServiceUnavailable(_UNAVAILABLE, headers={"Retry-After": "5"})

    async def used(self, key_id: str, bucket: str, seed: Seed) -> int:
        key = self.key(key_id, bucket)
        if self._reach.away:
            raise self._away()  # never guessed, and not waited for either
        try:
            value = await self._redis.get(key)
            if value is None:
                await self.seed(key, seed)
                value = await self._redis.get(key)
            return int(value or 0)
        except (RedisError, OSError):
            self._reach.went_down()
            raise self._away() from None

    async def reserve(
        self,
        key_id: str,
        bucket: str,
        amount: int,
        limit: int,
        seed: Seed,
        lease: Lease | None = None,
    ) -> tuple[bool, int]:
        key = self.key(key_id, bucket)
        keys: list[str] = [key]
        args: list[str | float | int] = [amount, limit]
        if lease is not None and self.leases is not None:
            lease.bucket, lease.reserved, lease.budget_key = bucket, amount, key
            keys += [self.leases.key(lease.call_id), self.leases.index]
            args += lease.args(self.leases.seconds)
        if self._reach.away:
            raise self._away()
        try:
            if self.leases is not None:  # Redis lost its data: this replica's calls go back first
                await self.leases.check()
            for _ in range(2):
                taken, used = await self._reserve(keys=keys, args=args)
                if int(taken) >= 0:
                    if taken and lease is not None and self.leases is not None:
                        self.leases.taken(lease)
                    return bool(taken), int(used)
                await self.seed(key, seed)
        except (RedisError, OSError):
            self._reach.went_down()
            raise self._away() from None
        return False, limit

    async def adjust(self, key_id: str, bucket: str, delta: int) -> None:
        if delta:
            await self._redis.incrby(self.key(key_id, bucket), delta)
