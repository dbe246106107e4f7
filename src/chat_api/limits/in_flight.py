"""How many calls each client key has open at once.

A call takes a slot when it is admitted and gives it back when it settles.
`MemoryInFlight` counts in this process. `RedisInFlight` keeps, per key, a
sorted set of the open calls' ids scored by when their hold runs out; each
replica renews the holds of its own open calls (`Holds`, shared with the
call leases) every third of the hold, so the calls of a replica that died
stop counting within the hold (`CHAT_API_LEASE_SECONDS`), without anybody
cleaning up. When Redis cannot be reached, it counts here against
this replica's share of the cap, as the rate counters do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_api import clock
from chat_api.store.shared import Reachability

log = logging.getLogger("chat_api.limits")

HOLD_SECONDS = 30.0


class Holds:
    """Members of Redis sorted sets this replica keeps alive, each scored by when it runs out.

    One renewer for everything a replica holds (calls in flight, call
    leases): every third of `seconds` it pushes each hold's end forward,
    and every second at most it runs the `checks` (noticing that Redis
    lost its data). What a dead
    replica held runs out within `seconds`.
    """

    def __init__(self, redis: Redis, *, seconds: float = HOLD_SECONDS) -> None:
        self._redis = redis
        self.seconds = seconds
        self._held: dict[tuple[str, str], None] = {}  # (sorted set, member)
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self.checks: list[Callable[[], Awaitable[None]]] = []

    @property
    def renew_every(self) -> float:
        return self.seconds / 3

    @property
    def check_every(self) -> float:
        """How often the `checks` run (a GET each): a lost Redis is noticed within this."""
        return min(1.0, self.renew_every)

    def until(self) -> float:
        return clock.now() + self.seconds

    def keep(self, zset: str, member: str) -> None:
        self._held[(zset, member)] = None
        if not self._closed and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="holds")

    def drop(self, zset: str, member: str) -> None:
        self._held.pop((zset, member), None)

    async def close(self) -> None:
        """Stop renewing (at shutdown, before Redis closes): what is left runs out."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def restore(self) -> None:
        """Put every hold back (Redis lost its data)."""
        if not self._held:
            return
        until = self.until()
        async with self._redis.pipeline(transaction=False) as pipe:
            for zset, member in list(self._held):
                pipe.zadd(zset, {member: until})
            await pipe.execute()

    async def _renew(self) -> None:
        renewed = time.monotonic()
        while self._held:
            await asyncio.sleep(self.check_every)
            try:
                if time.monotonic() - renewed >= self.renew_every:
                    renewed = time.monotonic()
                    until = self.until()
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for zset, member in list(self._held):
                            pipe.zadd(zset, {member: until}, xx=True)
                        await pipe.execute()
                for check in self.checks:
                    await check()
            except (RedisError, OSError) as exc:
                log.warning("could not renew calls in flight", extra={"error": type(exc).__name__})


class InFlight(Protocol):
    async def take(self, key_id: str, call_id: str, cap: int) -> bool:
        """Take a slot for `call_id` if `key_id` has fewer than `cap` open calls."""
        ...

    async def give_back(self, key_id: str, call_id: str) -> None: ...

    async def count(self, key_id: str) -> int: ...


class MemoryInFlight:
    def __init__(self) -> None:
        self._open: dict[str, set[str]] = {}

    async def take(self, key_id: str, call_id: str, cap: int) -> bool:
        return self.take_now(key_id, call_id, cap)

    def take_now(self, key_id: str, call_id: str, cap: int) -> bool:
        calls = self._open.setdefault(key_id, set())
        if len(calls) >= cap:
            return False
        calls.add(call_id)
        return True

    async def give_back(self, key_id: str, call_id: str) -> None:
        self.give_back_now(key_id, call_id)

    def give_back_now(self, key_id: str, call_id: str) -> None:
        calls = self._open.get(key_id)
        if calls is not None:
            calls.discard(call_id)
            if not calls:
                del self._open[key_id]

    async def count(self, key_id: str) -> int:
        return len(self._open.get(key_id, ()))


_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisInFlight:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        replicas: int,
        holds: Holds | None = None,
        reach: Reachability,
    ) -> None:
        self._redis = redis
        self._reach = reach
        self._prefix = prefix
        self._replicas = max(1, replicas)
        self._take = redis.register_script(_TAKE)
        self._holds = holds if holds is not None else Holds(redis)
        self._mine: dict[str, str] = {}  # call id -> key id, the calls this replica holds
        self._local = MemoryInFlight()

    def key(self, key_id: str) -> str:
        return f"{self._prefix}inflight:{key_id}"

    @property
    def hold_seconds(self) -> float:
        return self._holds.seconds

    def held(self, key_id: str, call_id: str) -> None:
        """Redis took a slot for `call_id` (here or in a combined script): keep it alive."""
        self._mine[call_id] = key_id
        self._holds.keep(self.key(key_id), call_id)

    def released(self, key_id: str, call_id: str) -> bool:
        """Stop keeping a slot; whether Redis holds it (and must be told)."""
        self._local.give_back_now(key_id, call_id)
        if self._mine.pop(call_id, None) is None:
            return False
        self._holds.drop(self.key(key_id), call_id)
        return True

    async def take(self, key_id: str, call_id: str, cap: int) -> bool:
        share = max(1, math.ceil(cap / self._replicas))
        if self._reach.away:
            return self._local.take_now(key_id, call_id, share)
        now = clock.now()
        seconds = self._holds.seconds
        try:
            taken = await self._take(
                keys=[self.key(key_id)],
                args=[now, now + seconds, cap, call_id, math.ceil(seconds * 2)],
            )
        except (RedisError, OSError) as exc:
            if self._reach.went_down():
                log.warning(
                    "Redis unreachable: calls in flight counted against this replica's share",
                    extra={"error": type(exc).__name__},
                )
            return self._local.take_now(key_id, call_id, share)
        if not taken:
            return False
        self.held(key_id, call_id)
        return True

    async def give_back(self, key_id: str, call_id: str) -> None:
        if not self.released(key_id, call_id):
            return
        with contextlib.suppress(RedisError, OSError):  # the hold runs out by itself
            await self._redis.zrem(self.key(key_id), call_id)

    async def count(self, key_id: str) -> int:
        try:
            return int(await self._redis.zcount(self.key(key_id), clock.now(), "+inf"))
        except (RedisError, OSError):
            return await self._local.count(key_id)
