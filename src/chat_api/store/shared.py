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
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# A burst of hundreds of calls on a small machine can keep Redis busy past half a second:
# 2 s before a call is taken as "Redis away" (budgets then answer 503).
SOCKET_TIMEOUT = 2.0


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
    return Redis.from_pool(pool)  # closing the client closes its pool
