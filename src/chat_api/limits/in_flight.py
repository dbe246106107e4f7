"""How many calls each client key has open at once.

A call takes a slot when it is admitted and gives it back when it settles.
`MemoryInFlight` counts in this process. `RedisInFlight` keeps, per key, a
sorted set of the open calls' ids scored by when their hold runs out; each
replica renews the holds of its own open calls every few seconds, so the
calls of a replica that died stop counting within `HOLD_SECONDS`, without
anybody cleaning up. When Redis cannot be reached, it counts here against
this replica's share of the cap, as the rate counters do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("chat_api.limits")

HOLD_SECONDS = 30.0
RENEW_EVERY = 10.0


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
    def __init__(self, redis: Redis, *, prefix: str, replicas: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._replicas = max(1, replicas)
        self._take = redis.register_script(_TAKE)
        self._mine: dict[str, str] = {}  # call id -> key id, the calls this replica holds
        self._local = MemoryInFlight()
        self._renewer: asyncio.Task[None] | None = None

    def _key(self, key_id: str) -> str:
        return f"{self._prefix}inflight:{key_id}"

    async def take(self, key_id: str, call_id: str, cap: int) -> bool:
        now = time.time()
        try:
            taken = await self._take(
                keys=[self._key(key_id)],
                args=[now, now + HOLD_SECONDS, cap, call_id, math.ceil(HOLD_SECONDS * 2)],
            )
        except (RedisError, OSError) as exc:
            log.warning(
                "Redis unreachable: calls in flight counted against this replica's share",
                extra={"error": type(exc).__name__},
            )
            return self._local.take_now(key_id, call_id, max(1, math.ceil(cap / self._replicas)))
        if not taken:
            return False
        self._mine[call_id] = key_id
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="in-flight")
        return True

    async def give_back(self, key_id: str, call_id: str) -> None:
        self._local.give_back_now(key_id, call_id)
        if self._mine.pop(call_id, None) is None:
            return
        with contextlib.suppress(RedisError, OSError):  # the hold runs out by itself
            await self._redis.zrem(self._key(key_id), call_id)

    async def count(self, key_id: str) -> int:
        try:
            return int(await self._redis.zcount(self._key(key_id), time.time(), "+inf"))
        except (RedisError, OSError):
            return await self._local.count(key_id)

    async def _renew(self) -> None:
        while self._mine:
            await asyncio.sleep(RENEW_EVERY)
            until = time.time() + HOLD_SECONDS
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for call_id, key_id in list(self._mine.items()):
                        pipe.zadd(self._key(key_id), {call_id: until}, xx=True)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not renew calls in flight", extra={"error": type(exc).__name__})
