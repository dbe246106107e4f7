"""The limits tests' fixtures: the keys suite's (Redis, PostgreSQL), and an upstream that bills."""

from collections.abc import Iterator

import pytest

from tests.fakes.billing_upstream import BillingUpstream
from tests.keys.conftest import postgres_url, private_redis, shared_redis
from tests.servers import ServerThread

__all__ = ["postgres_url", "private_redis", "shared_redis", "upstream"]


@pytest.fixture
def upstream() -> Iterator[tuple[BillingUpstream, str]]:
    """A fake OpenAI that bills as OpenAI does (tests/fakes/billing_upstream.py), and its URL."""
    fake = BillingUpstream()
    with ServerThread(fake) as server:
        yield fake, server.url + "/v1"
