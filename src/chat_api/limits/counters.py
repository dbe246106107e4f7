"""Per-minute counters for request and token rates.

Windows are whole minutes of the clock, so every replica counts in the same
window. `MemoryCounter` counts in this process; `RedisCounter` counts in
Redis with one atomic script per hit, so N replicas together hold the limit.
When Redis cannot be reached, `RedisCounter` falls back to counting here
against this replica's share of the limit, and tries Redis again a second
later. Each replica remembers what it counted in the current window: when
Redis is back, what it counted meanwhile is added there, and a window
found empty mid-minute (Redis lost its data) gets back what this replica
had counted in it, so a restart does not start the minute again from 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_api import clock
from chat_api.store.shared import Reachability

log = logging.getLogger("chat_api.limits")

WINDOW = 60


@dataclass(frozen=True, slots=True)
class Hit:
    allowed: bool
    used: int
    window: int
    reset_in: float


class Counter(Protocol):
    async def hit(self, name: str, amount: int, limit: int, *, whole: bool = True) -> Hit:
        """Count `amount` if it fits under `limit` in this minute.

        `whole=False`: count it while the minute is still under `limit`, so
        one call may pass the limit by its own amount (token limits: a call
        with a large worst case must still be possible on a small limit).
        """
        ...

    async def add(self, name: str, window: int, amount: int) -> None:
        """Correct a window's count (after the real token usage is known)."""
        ...


def minute_of(now: float) -> tuple[int, float]:
    """The window of the clock reading `now`, and the seconds until it ends."""
    window = int(now // WINDOW)
    return window, (window + 1) * WINDOW - now


class MemoryCounter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._last_window = 0

    async def hit(self, name: str, amount: int, limit: int, *, whole: bool = True) -> Hit:
        return self.hit_now(name, amount, limit, whole=whole)

    def hit_now(self, name: str, amount: int, limit: int, *, whole: bool = True) -> Hit:
        window, reset = minute_of(clock.now())
        if window != self._last_window:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= window - 1}
            self._last_window = window
        used = self._counts.get((name, window), 0)
        if (used + amount > limit) if whole else (used >= limit):
            return Hit(False, used, window, reset)
        self._counts[(name, window)] = used + amount
        return Hit(True, used + amount, window, reset)

    async def add(self, name: str, window: int, amount: int) -> None:
        key = (name, window)
        if key in self._counts:
            self._counts[key] = max(0, self._counts[key] + amount)


_HIT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 120) end
local over = n > tonumber(ARGV[2])
if ARGV[3] == '0' then over = n - tonumber(ARGV[1]) >= tonumber(ARGV[2]) end
if over then
  redis.call('DECRBY', KEYS[1], ARGV[1])
  return {0, n - tonumber(ARGV[1])}
end
return {1, n}
"""


class RedisCounter:
    def __init__(self, redis: Redis, *, prefix: str, replicas: int, reach: Reachability) -> None:
        self._redis = redis
        self._prefix = prefix
        self._replicas = max(1, replicas)
        self._hit = redis.register_script(_HIT)
        self._local = MemoryCounter()
        self.reach = reach
        self._mine: dict[tuple[str, int], int] = {}  # what this replica counted, per window
        self._owed: dict[tuple[str, int], int] = {}  # counted here while Redis was away

    @property
    def degraded(self) -> bool:
        return self.reach.away

    def key(self, name: str, window: int) -> str:
        return f"{self._prefix}{name}:{window}"

    async def counted(self, name: str, window: int, amount: int, used: int) -> int:
        """After Redis counted `amount` (to `used`) in a combined script; what was put back."""
        slot = (name, window)
        back = 0
        if used == amount or slot in self._owed:  # else Redis holds all this replica counted
            back = await self._put_back(self.key(name, window), slot, fresh=used == amount)
        self._count(slot, amount)
        return back

    def corrected(self, name: str, window: int, amount: int) -> None:
        """This replica's own record of a correction Redis was sent elsewhere."""
        if (name, window) in self._mine:
            self._mine[(name, window)] = max(0, self._mine[(name, window)] + amount)

    def went_down(self, exc: Exception) -> None:
        if self.reach.went_down():
            log.warning(
                "Redis unreachable: rate limits fall back to this replica's share",
                extra={"error": type(exc).__name__},
            )

    async def hit(self, name: str, amount: int, limit: int, *, whole: bool = True) -> Hit:
        window, reset = minute_of(clock.now())
        slot = (name, window)
        if not self.degraded:
            key = self.key(name, window)
            try:
                allowed, used = await self._hit(keys=[key], args=[amount, limit, int(whole)])
                used = int(used)
                if allowed:
                    used += await self._put_back(key, slot, fresh=used == amount)
                    self._count(slot, amount)
                return Hit(bool(allowed), used, window, reset)
            except (RedisError, OSError) as exc:
                self.went_down(exc)
        # This replica's share, counting what it already counted in this window.
        share = max(1, math.ceil(limit / self._replicas))
        used = self._mine.get(slot, 0)
        if (used + amount > share) if whole else (used >= share):
            return Hit(False, used, window, reset)
        self._count(slot, amount)
        self._owed[slot] = self._owed.get(slot, 0) + amount
        return Hit(True, used + amount, window, reset)

    def _count(self, slot: tuple[str, int], amount: int) -> None:
        if slot not in self._mine:  # a new window: forget the old ones
            self._mine = {k: v for k, v in self._mine.items() if k[1] >= slot[1] - 1}
            self._owed = {k: v for k, v in self._owed.items() if k[1] >= slot[1]}
        self._mine[slot] = self._mine.get(slot, 0) + amount

    async def _put_back(self, key: str, slot: tuple[str, int], *, fresh: bool) -> int:
        """What this replica counted that Redis does not hold (lost, or counted while away)."""
        owed = self._owed.pop(slot, 0)
        back = self._mine.get(slot, 0) if fresh else owed
        if back > 0:
            await self._redis.incrby(key, back)
        return back

    async def add(self, name: str, window: int, amount: int) -> None:
        if amount == 0:
            return
        await self._local.add(name, window, amount)
        self.corrected(name, window, amount)
        if self.degraded:
            return
        try:
            await self._redis.incrby(self.key(name, window), amount)
        except (RedisError, OSError) as exc:
            self.went_down(exc)
