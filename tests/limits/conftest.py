"""The keys suite's fixtures (Redis, PostgreSQL), for the limits tests too."""

from tests.keys.conftest import postgres_url, private_redis, shared_redis

__all__ = ["postgres_url", "private_redis", "shared_redis"]
