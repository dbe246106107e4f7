"""The Redis client every replica shares limits, budgets and the key-set version through.

Short timeouts, because every request waits on Redis: a Redis that does not
answer within `SOCKET_TIMEOUT` (2 s) counts as away (rate limits fall back to this
replica's share, budgets answer 503). A command that fails because its
pooled connection went stale (Redis restarted, a proxy closed an idle
connection) is tried once more on a fresh connection before anyone is
refused. Only connection errors are retried: after a timeout the command
may have run, and counting a request twice is worse than refusing it. A
burst that wants more than `MAX_CONNECTIONS` at once waits for one: a busy
pool is not a Redis that is away (redis-py's default pool refuses the
101st at once, which read as "Redis unreachable" and sent every budget
to 503 for a second).

Once a command fails, Redis counts as away for everything in this process
at once (`Reachability`): each user falls back its own way without waiting
out a timeout of its own, until a probe finds Redis answering again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("chat_api.limits")

# A burst of hundreds of calls on a small machine can keep Redis busy past half a second:
# 2 s before a call is taken as "Redis away" (budgets then answer 503).
SOCKET_TIMEOUT = 2.0


# While Redis is away, it is asked (one PING) this often; requests do not wait on it.
PROBE_EVERY = 1.0
# A call that would be refused while Redis is away asks it itself first, if nobody did
# in the last ASK_GAP seconds, and waits for that answer at most ASK_WAIT seconds.
ASK_GAP = 0.05
ASK_WAIT = 0.1


# Connections a replica may hold at once. A burst asks for more: the rest wait for one
# (up to SOCKET_TIMEOUT), rather than failing as if Redis were away.
MAX_CONNECTIONS = 100


def open_redis(url: str) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    kind = pool.connection_class  # by the URL's scheme: TCP, TLS or a Unix socket
    pool.connection_class = type(kind.__name__, (_ClosedIsLost, kind), {})
    return Redis.from_pool(pool)  # closing the client closes its pool


class _ClosedIsLost(AbstractConnection):
    """A write on a connection Redis (or a proxy) reset meanwhile is a connection error.

    uvloop raises `RuntimeError("... the handler is closed")` there, which
    redis-py passes on as it is: a 500 instead of one retry on a fresh
    connection, then the fallbacks of a Redis that is away (seen with a proxy
    that resets connections while they connect).
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "closed" not in str(exc):
                raise
            await self.disconnect(nowait=True)
            raise RedisConnectionError("Redis closed the connection as it was written to") from exc


class Reachability:
    """Whether Redis answers, as this process last found out, for all that uses it.

    A hung Redis (stopped, or cut off without a reset) used to cost every
    call one timeout per thing that asked it (admission, then each limit's
    own fallback, the lease, the key set's version): 4 s for a master-key
    call, 8 s for a client key's, on every request. Now the first failure
    counts Redis as away for all of them at once, each falls back its own
    way (rate limits to this replica's share, budgets to 503, cached keys
    trusted a second at a time, the lease skipped), and a probe asks Redis
    every `PROBE_EVERY` until it answers; only then do requests use it again.
    A call that would be refused meanwhile (a budget's 503) asks first
    (`answers_again`): Redis back a moment ago is used at once, not up to a
    second later.
    """

    def __init__(self, redis: Redis | None) -> None:
        self._redis = redis
        self.away = False
        self._probe: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[None] | None = None
        self._asked_at = -ASK_GAP
        self._closed = False

    async def answers_again(self) -> bool:
        """Whether Redis answers now; without waiting on it while it is not counted away.

        Calls at the same moment share one `PING`, sent at most every
        `ASK_GAP`; each waits at most `ASK_WAIT` for it, and only for a
        `PING` that young (a hung Redis holds one until its timeout: the calls
        after it do not wait for that one, they fall back at once).
        """
        if not self.away:
            return True
        if self._redis is None or self._closed:
            return False
        loop = asyncio.get_running_loop()
        if self._asking is None and loop.time() - self._asked_at >= ASK_GAP:
            self._asked_at = loop.time()
            self._asking = loop.create_task(self._ask(), name="redis-ask")
        left = self._asked_at + ASK_WAIT - loop.time()
        if self._asking is not None and left > 0:
            try:
                async with asyncio.timeout(left):
                    await asyncio.shield(self._asking)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this call is being cancelled, not the PING (closed at shutdown)
        return not self.away

    async def _ask(self) -> None:
        assert self._redis is not None
        try:
            await self._redis.ping()
        except (RedisError, OSError):
            return
        finally:
            self._asking = None
        self._back()

    def _back(self) -> None:
        if not self.away:
            return
        self.away = False
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
        log.warning("Redis answers again: limits are shared again")

    def went_down(self) -> bool:
        """Count Redis as away; True when it was not already (the caller may say so)."""
        if self.away:
            return False
        self.away = True
        if self._redis is not None and not self._closed:
            loop = asyncio.get_running_loop()
            self._probe = loop.create_task(self._until_it_answers(), name="redis-probe")
        return True

    async def _until_it_answers(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(PROBE_EVERY)
            try:
                await self._redis.ping()
            except (RedisError, OSError):
                continue
            self._back()
            return

    async def close(self) -> None:
        self._closed = True
        for task in (self._probe, self._asking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
