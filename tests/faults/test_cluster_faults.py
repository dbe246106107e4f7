"""Three replicas on one PostgreSQL and one Redis: a burst, a Redis restart, a hung database.

The PostgreSQL server is the test's own (`max_connections=60`, reached
through a proxy that can hang), and so is the Redis (restarted mid-test), so
nothing here disturbs the machine's shared servers. One set of replicas goes
through every fault in turn: starting processes is what takes time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.faults.conftest import size, wait_until
from tests.faults.storage import TcpProxy, ThrowawayPostgres, postgres_binaries
from tests.keys.conftest import MASTER, PrivateRedis, auth, make_key
from tests.ops.conftest import GatewayProcess, Spawn

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # three processes, their own servers

DATABASE_TIMEOUT = 3.0  # the default: what operators get
WAITED_AT_MOST = DATABASE_TIMEOUT + 4  # generous: this machine is shared and busy


@pytest.fixture
def database() -> Iterator[tuple[ThrowawayPostgres, TcpProxy]]:
    """A PostgreSQL server of this test's own, with `max_connections=60`, behind a proxy."""
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL server binaries are not installed (/usr/lib/postgresql/*/bin)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as 'postgres'")
    try:
        server = ThrowawayPostgres(max_connections="60")
    except (subprocess.CalledProcessError, KeyError, OSError) as exc:
        pytest.skip(f"could not start a throwaway PostgreSQL server: {exc}")
    proxy = TcpProxy(server.port)
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.fixture
def replicas(
    database: tuple[ThrowawayPostgres, TcpProxy],
    private_redis: PrivateRedis,
    spawn: Spawn,
    fake: FakeOpenAI,
    upstream_url: str,
) -> list[GatewayProcess]:
    server, proxy = database
    env = {
        "OPENAI_API_KEY": fake.api_key,
        "OPENAI_BASE_URL": upstream_url,
        "CHAT_API_MASTER_KEY": MASTER,
        "CHAT_API_DATABASE_URL": server.url(proxy.port),
        "CHAT_API_REDIS_URL": private_redis.url,
        "CHAT_API_REPLICAS": "3",
        "CHAT_API_DATABASE_TIMEOUT": str(DATABASE_TIMEOUT),
    }
    first = spawn(env)  # migrates the schema alone; the others find it done
    return [first, *ThreadPoolExecutor(2).map(lambda _: spawn(env), range(2))]


def chat(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/chat", json={"message": "hi"}, headers=auth(key), timeout=30)


async def _burst(urls: list[str], key: str, count: int) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(index: int) -> tuple[int, str]:
            response = await client.post(
                urls[index % len(urls)] + "/chat", json={"message": "hi"}, headers=auth(key)
            )
            return response.status_code, response.text[:200]

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def _timed(client: httpx.Client, method: str, url: str, key: str) -> tuple[int, str | None, float]:
    started = time.monotonic()
    body = {"message": "hi"} if method == "POST" else None
    response = client.request(method, url, json=body, headers=auth(key))
    return response.status_code, response.headers.get("retry-after"), time.monotonic() - started


def test_three_replicas_through_a_burst_a_redis_restart_and_a_hung_database(
    replicas: list[GatewayProcess],
    database: tuple[ThrowawayPostgres, TcpProxy],
    private_redis: PrivateRedis,
    fake: FakeOpenAI,
) -> None:
    one, two, three = replicas
    urls = [replica.url for replica in replicas]
    _, proxy = database

    # A burst with a key no replica has seen yet, against max_connections=60 (each replica's
    # pool may open 30): key checks share one query per replica, and no request gets 503.
    count = size(1000, 300)
    key, _ = make_key(
        one.url, rpm=1_000_000, tpm=1_000_000_000, budget_usd="1000", max_in_flight=count
    )
    answers = asyncio.run(_burst(urls, key, count))
    statuses = [status for status, _ in answers]
    refusals = {text for status, text in answers if status != 200}
    print(f"burst of {count}: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert statuses.count(503) == 0, refusals
    assert statuses == [200] * count, refusals

    # A key revoked through one replica is refused by every replica at once, cached or not.
    revocable, revocable_id = make_key(two.url)
    assert [chat(url, revocable).status_code for url in urls] == [200] * 3
    revoked = httpx.delete(three.url + f"/admin/keys/{revocable_id}", headers=auth(MASTER))
    assert revoked.status_code == 200
    assert [chat(url, revocable).status_code for url in urls] == [401] * 3

    # Redis restarts: every replica's pooled connections are stale. The next budgeted,
    # rate-limited request on each replica is served (one retry on a fresh connection).
    budgeted, _ = make_key(one.url, rpm=1000, budget_usd="50", budget_period="monthly")
    assert [chat(url, budgeted).status_code for url in urls] == [200] * 3
    # Only what the replicas log from the restart on: a loaded machine may time a Redis
    # call out during the burst above (falling back, still no 503), which is not this case.
    seen = [len(replica.logs()) for replica in replicas]
    private_redis.stop()
    private_redis.start()
    after = [chat(url, budgeted) for url in urls]
    assert [answer.status_code for answer in after] == [200] * 3, [
        (answer.text, replica.logs()[before:][-3000:])
        for answer, replica, before in zip(after, replicas, seen, strict=True)
        if answer.status_code != 200
    ]
    for replica, before in zip(replicas, seen, strict=True):
        assert "Redis unreachable" not in replica.logs()[before:]

    # The database hangs: key checks that need it, usage and admin reads and /ready give up
    # after CHAT_API_DATABASE_TIMEOUT with 503 and Retry-After; cached keys keep working.
    fresh, _ = make_key(two.url)
    for replica in replicas:  # usage rows written, so reads have something to wait for
        assert httpx.get(replica.url + "/usage", headers=auth(budgeted)).status_code == 200
    fake.queue(*[Plan() for _ in range(10)])
    proxy.hang()
    calls = [("POST", url + "/chat", fresh) for url in urls for _ in range(size(10, 3))]
    calls += [("GET", url + "/usage", budgeted) for url in urls]
    calls += [("GET", url + "/admin/keys", MASTER) for url in urls]
    # Whose is this response? Not cached anywhere: the owners table must be asked.
    calls += [("GET", url + "/v1/responses/resp_never_seen_here", budgeted) for url in urls]
    limits = httpx.Limits(max_connections=len(calls))
    with ThreadPoolExecutor(len(calls)) as pool, httpx.Client(timeout=60, limits=limits) as client:
        outcomes = list(pool.map(lambda call: _timed(client, *call), calls))
    ready = [httpx.get(url + "/ready", timeout=WAITED_AT_MOST) for url in urls]
    served = chat(one.url, MASTER)  # the master key needs no database on the way
    waits = sorted(wait for _, _, wait in outcomes)
    print(
        f"database hung: {len(outcomes)} requests, all 503 after "
        f"{waits[len(waits) // 2]:.2f} s (p50), {waits[-1]:.2f} s (max)"
    )
    assert [status for status, _, _ in outcomes] == [503] * len(outcomes)
    assert all(retry_after == "5" for _, retry_after, _ in outcomes)
    # Here the time is the outcome: against a hung database a request must give up after
    # CHAT_API_DATABASE_TIMEOUT (3 s) with its 503, not hang until the client's own timeout.
    assert waits[-1] < WAITED_AT_MOST
    assert [response.status_code for response in ready] == [503] * 3
    assert ready[0].json()["checks"]["database"].startswith("failing")
    assert served.status_code == 200

    proxy.resume()
    assert wait_until(lambda: chat(three.url, fresh).status_code == 200, 10, interval=0.2)
    assert [httpx.get(url + "/ready").status_code for url in urls] == [200] * 3
    assert httpx.get(one.url + "/admin/keys", headers=auth(MASTER)).status_code == 200
