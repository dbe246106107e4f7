"""Storage faults: Redis dies and comes back, SQLite is locked, PostgreSQL goes away."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from chat_api.store import ledger as ledger_module
from tests.fakes.openai_server import FakeOpenAI
from tests.faults.conftest import GatewayMaker, ledger_rows, size, wait_until
from tests.keys.conftest import MASTER, PG_ADMIN, PrivateRedis, auth, make_key

pytestmark = pytest.mark.faults


def chat(url: str, key: str | None = None) -> httpx.Response:
    headers = auth(key) if key else {}
    return httpx.post(url + "/chat", json={"message": "hi"}, headers=headers, timeout=10)


# --- Redis ------------------------------------------------------------------------------------


def test_redis_killed_mid_test_falls_back_then_recovers_within_5s(
    gw: GatewayMaker, private_redis: PrivateRedis
) -> None:
    server = gw(master_key=MASTER, redis_url=private_redis.url, redis_prefix="faults:")
    limited, _ = make_key(server.url, rpm=1000)
    budgeted, _ = make_key(server.url, budget_usd="5", budget_period="monthly")
    assert chat(server.url, limited).status_code == 200
    assert chat(server.url, budgeted).status_code == 200

    private_redis.stop()
    # Request limits fall back to this replica's share: still served.
    assert [chat(server.url, limited).status_code for _ in range(5)] == [200] * 5
    # Money is not guessed: budgets fail closed with a 503 and Retry-After.
    refused = chat(server.url, budgeted)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "Budgets cannot be checked" in refused.json()["error"]
    # A wrong key is still a 401 (failed-auth counting falls back too), never a 500.
    assert chat(server.url, "cak_" + "x" * 43).status_code == 401
    ready = httpx.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("failing")

    private_redis.start()
    assert wait_until(lambda: chat(server.url, budgeted).status_code == 200, 5, interval=0.2)
    assert chat(server.url, limited).status_code == 200
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200


# --- SQLite -----------------------------------------------------------------------------------


def test_sqlite_locked_by_another_connection_serves_requests_and_writes_rows_later(
    gw: GatewayMaker, fake: FakeOpenAI, tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    server = gw(master_key=MASTER, ledger_flush_interval=0.2)
    secret, _ = make_key(server.url)
    assert chat(server.url, secret).status_code == 200
    assert wait_until(lambda: len(ledger_rows(db)) == 1, 5)

    served = size(500, 30)
    locker = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        # Every request is answered while the lock is held: none waits for the database.
        for _ in range(served):
            assert chat(server.url, secret).status_code == 200
            time.sleep(0.05)  # a few flushes try, and fail, in between
        assert len(ledger_rows(db)) == 1, "a row was written through the lock?"
        assert server.state.ledger.backlog >= 1
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert wait_until(lambda: len(ledger_rows(db)) == 1 + served, 10)
    assert fake.hits == 1 + served
    assert server.state.ledger.dropped == 0


# --- PostgreSQL -------------------------------------------------------------------------------


async def _admin(*statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN)
    try:
        for sql in statements:
            await connection.execute(sql)
    finally:
        await connection.close()


async def _count(url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage"))
    finally:
        await connection.close()


async def _request_ids(url: str) -> set[str]:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return {row[0] for row in await connection.fetch("SELECT request_id FROM usage")}
    finally:
        await connection.close()


def _pg_rows(url: str) -> int:
    try:
        return asyncio.run(_count(url))
    except Exception:
        return -1


def _take_away(name: str) -> None:
    """The database refuses new connections, and the gateway's are cut.

    Each cut is waited for (up to 5 s), so the database is away when this returns.
    """
    asyncio.run(
        _admin(
            f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "  # noqa: S608
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
    )


def _bring_back(name: str) -> None:
    asyncio.run(_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


@contextlib.contextmanager
def database_away(url: str) -> object:
    name = url.rsplit("/", 1)[1]
    _take_away(name)
    try:
        yield
    finally:
        _bring_back(name)


@pytest.mark.slow
def test_postgres_going_away_keeps_rows_queued_and_loses_none(
    postgres_url: str, gw: GatewayMaker, fake: FakeOpenAI
) -> None:
    server = gw(database_url=postgres_url, ledger_flush_interval=0.2)
    for _ in range(5):
        assert chat(server.url).status_code == 200
    assert wait_until(lambda: _pg_rows(postgres_url) == 5, 5)

    during = size(500, 40)
    with database_away(postgres_url):
        assert _pg_rows(postgres_url) == -1  # really away
        for _ in range(during):
            assert chat(server.url).status_code == 200
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 503
        ledger = server.state.ledger
        assert wait_until(lambda: ledger.backlog == during, 5), ledger.backlog
        time.sleep(0.6)  # a few failed flushes (every 0.2 s): the queue holds, nothing is dropped
        assert ledger.backlog == during and ledger.dropped == 0
    back = time.monotonic()
    assert wait_until(lambda: _pg_rows(postgres_url) == 5 + during, 10)
    print(
        f"{during} queued rows written {time.monotonic() - back:.2f} s after the database came back"
    )
    assert server.state.ledger.backlog == 0  # the queue empties: no memory held on to
    assert fake.hits == 5 + during
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200


def test_postgres_outage_longer_than_the_queue_drops_the_oldest_and_says_so(
    gw: GatewayMaker,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(ledger_module, "MAX_PENDING", 10)
    server = gw(database_url=postgres_url, ledger_flush_interval=0.2)
    first = chat(server.url)
    assert first.status_code == 200
    assert wait_until(lambda: _pg_rows(postgres_url) == 1, 5)
    during = []
    with database_away(postgres_url):
        for _ in range(15):
            answer = chat(server.url)
            assert answer.status_code == 200
            during.append(answer.headers["x-request-id"])
        ledger = server.state.ledger
        # A call's row is added just after its answer is sent: the last one may lag it.
        assert wait_until(lambda: ledger.dropped == 5, 5), ledger.dropped
        assert ledger.backlog == 10  # bounded: memory cannot grow without end
    assert wait_until(lambda: _pg_rows(postgres_url) == 11, 10)
    # The oldest five went; the ten newest are the ones written.
    kept = asyncio.run(_request_ids(postgres_url))
    assert kept == {first.headers["x-request-id"], *during[5:]}
    # Said, with how many, but not once a call: a long outage under load is not a flood.

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "ledger backlog full" in r.getMessage()]

    assert wait_until(lambda: len(said()) >= 2, 5)
    assert said() == [
        "ledger backlog full: dropped the oldest 1 row(s) (1 in all)",
        "ledger backlog full: dropped the oldest 4 row(s) (5 in all)",  # once written again
    ]


def test_postgres_away_with_keys_on_is_a_503_not_a_500(
    postgres_url: str, gw: GatewayMaker, fake: FakeOpenAI
) -> None:
    server = gw(database_url=postgres_url, master_key=MASTER)
    used, _ = make_key(server.url)
    assert chat(server.url, used).status_code == 200
    secret, _ = make_key(server.url)  # not cached yet: checking it needs the database
    with database_away(postgres_url):
        refused = chat(server.url, secret)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert "Keys cannot be checked" in refused.json()["error"]
        assert chat(server.url, MASTER).status_code == 200  # the master key needs no lookup
    assert wait_until(lambda: chat(server.url, secret).status_code == 200, 10, interval=0.3)
