"""Replicas that die (`kill -9`) and a Redis that loses its data, with calls in flight.

Three `chat-api serve` processes on one PostgreSQL and one Redis of the
test's own, in front of a fake upstream that bills like OpenAI and counts
every call it got: the ground truth the ledger is held to.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from tests.clock import Clock
from tests.fakes.billing_upstream import BillingUpstream
from tests.faults.conftest import seconds, size, wait_until
from tests.keys.conftest import MASTER, PrivateRedis, auth, make_key
from tests.ops.conftest import GatewayProcess, Spawn
from tests.servers import ServerThread

pytestmark = pytest.mark.faults

LEASE_SECONDS = 1.5
PRICES = '{"gpt-4o-mini": [1000, 1000]}'  # $0.001 a token either way
MAX_TOKENS = 20


@pytest.fixture
def billing() -> Iterator[tuple[BillingUpstream, str]]:
    fake = BillingUpstream()
    with ServerThread(fake) as server:
        yield fake, server.url + "/v1"


def _cluster(
    spawn: Spawn, postgres_url: str, redis_url: str, upstream: tuple[BillingUpstream, str]
) -> list[GatewayProcess]:
    fake, url = upstream
    env = {
        "OPENAI_API_KEY": fake.api_key,
        "OPENAI_BASE_URL": url,
        "CHAT_API_MASTER_KEY": MASTER,
        "CHAT_API_DATABASE_URL": postgres_url,
        "CHAT_API_REDIS_URL": redis_url,
        "CHAT_API_REPLICAS": "3",
        "CHAT_API_PRICES": PRICES,
        "CHAT_API_UPSTREAM_RETRIES": "0",
        "CHAT_API_LEASE_SECONDS": str(LEASE_SECONDS),
        "CHAT_API_REAPER_INTERVAL": "0.3",
    }
    first = spawn(env)  # migrates the database alone; the others start side by side
    return [first, *ThreadPoolExecutor(2).map(lambda _: spawn(env), range(2))]


class Load:
    """Clients sending mixed streamed and whole answers over the replicas until stopped."""

    def __init__(self, replicas: list[GatewayProcess], key: str, clients: int) -> None:
        self.urls = [replica.url for replica in replicas]
        self.dead: set[str] = set()
        self.key = key
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, index: int) -> None:
        turn = index
        with httpx.Client(timeout=20, headers=auth(self.key)) as client:
            while not self._stop.is_set():
                turn += 1
                url = self.urls[turn % len(self.urls)]
                if url in self.dead:
                    continue
                body: dict[str, Any] = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": MAX_TOKENS,
                    "stream": turn % 2 == 0,
                }
                try:
                    with client.stream("POST", url + "/v1/chat/completions", json=body) as answer:
                        for _ in answer.iter_bytes():
                            pass
                        self.statuses.append(answer.status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)  # the replica died under it


def _ledger(postgres_url: str, key_id: str | None) -> list[dict[str, Any]]:
    """The key's rows (None: the master key's)."""

    async def read() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
        try:
            if key_id is None:
                rows = await connection.fetch("SELECT * FROM usage WHERE key_id IS NULL")
            else:
                rows = await connection.fetch("SELECT * FROM usage WHERE key_id = $1", key_id)
        finally:
            await connection.close()
        return [dict(row) for row in rows]

    return asyncio.run(read())


def _micro(amount: Decimal) -> int:
    return int(amount * 1_000_000)


@pytest.mark.slow
def test_a_replica_killed_mid_load_loses_no_row_and_holds_no_reservation(
    postgres_url: str,
    private_redis: PrivateRedis,
    spawn: Spawn,
    billing: tuple[BillingUpstream, str],
) -> None:
    fake, _ = billing
    fake.behaviour.token_interval = 0.05  # a stream takes about a second: some are always open
    fake.behaviour.delay = 0.05
    replicas = _cluster(spawn, postgres_url, private_redis.url, billing)
    budget = Decimal(size(full=40, ci=4))
    key, key_id = make_key(replicas[0].url, budget_usd=str(budget), budget_period="total")
    victim = replicas[2]
    store = redis.Redis.from_url(private_redis.url)
    prefix = "chatapi:"
    # The master key's calls have no limits, but a lease too: they must not lose rows either.
    with (
        Load(replicas, key, clients=size(full=24, ci=9)) as load,
        Load(replicas, MASTER, clients=size(full=6, ci=4)) as master_load,
    ):
        time.sleep(seconds(4.0, 1.5))
        wait_until(lambda: store.zcard(prefix + "leases") >= 6, timeout=5)
        load.dead.add(victim.url)
        master_load.dead.add(victim.url)
        victim.signal(signal.SIGKILL)
        time.sleep(seconds(4.0, 1.0))
    assert victim.wait(5) == -signal.SIGKILL

    def all_rows() -> list[dict[str, Any]]:
        return _ledger(postgres_url, key_id) + _ledger(postgres_url, None)

    def settled() -> bool:
        return not store.zcard(prefix + "leases") and len(all_rows()) >= fake.calls

    # Within the bound: the lease runs out, a reaper (every 0.3 s) writes the row.
    assert wait_until(settled, timeout=LEASE_SECONDS * 4 + 5, interval=0.2)
    master_rows = _ledger(postgres_url, None)
    assert master_rows and len({row["call_id"] for row in master_rows}) == len(master_rows)
    rows = all_rows()
    assert len({row["call_id"] for row in rows}) == len(rows)  # no call with two rows
    lost = [row for row in rows if row["outcome"] == "replica_lost"]
    outcomes = sorted((row["outcome"], row["streamed"]) for row in rows)
    assert lost, ("no call in flight was killed", outcomes, load.statuses, fake.calls)
    # No call without a row. A call the dead replica admitted but had not yet sent may
    # never have reached the upstream: it is billed anyway (errs on the operator's side).
    assert fake.calls <= len(rows) <= fake.calls + len(lost)
    assert all(row["estimated"] for row in lost)
    assert all(
        row["completion_tokens"] == MAX_TOKENS for row in lost
    )  # billed at the worst case: errs on the operator's side
    assert load.statuses.count(200) > len(rows) / 2

    rows = [row for row in rows if row["key_id"] == key_id]
    spent = sum((row["cost_usd"] for row in rows), Decimal(0))
    worst_call = max(row["cost_usd"] for row in rows)
    assert spent <= budget + worst_call  # the budget held, whatever died
    counter = int(store.get(f"{prefix}budget:{key_id}:t") or 0)
    # No reservation stuck: the shared counter is what the ledger says (to a µ$ a row).
    assert _micro(spent) <= counter <= _micro(spent) + len(rows)
    assert not store.keys(prefix + "lease:*")
    store.close()


@pytest.mark.slow
def test_redis_restarted_without_its_data_keeps_the_budget_with_calls_in_flight(
    postgres_url: str,
    private_redis: PrivateRedis,
    spawn: Spawn,
    billing: tuple[BillingUpstream, str],
) -> None:
    fake, _ = billing
    fake.behaviour.token_interval = 0.05  # a stream takes about a second: many are open
    replicas = _cluster(spawn, postgres_url, private_redis.url, billing)
    budget = Decimal(size(full=3, ci=1)) / 2
    key, key_id = make_key(replicas[0].url, budget_usd=str(budget), budget_period="total")
    with Load(replicas, key, clients=size(full=30, ci=12)) as load:
        time.sleep(seconds(1.5, 1.0))
        private_redis.stop()  # no persistence: everything it held is gone
        private_redis.start()
        wait_until(lambda: load.statuses[-6:].count(429) == 6, timeout=seconds(20, 8))

    store = redis.Redis.from_url(private_redis.url)

    def settled() -> bool:
        return len(_ledger(postgres_url, key_id)) >= fake.calls and not store.zcard(
            "chatapi:leases"
        )

    ok = wait_until(settled, timeout=LEASE_SECONDS * 4 + 5, interval=0.2)
    rows = _ledger(postgres_url, key_id)
    leftover = [
        {k: v for k, v in store.hgetall(k).items() if k in (b"settled", b"written", b"at")}
        for k in store.keys("chatapi:lease:*")
    ] + [store.zrange("chatapi:leases", 0, -1, withscores=True), time.time()]
    assert ok, (len(rows), fake.calls, leftover[:3], [r.logs()[-3000:] for r in replicas[:1]])
    assert len(rows) == fake.calls
    assert 429 in load.statuses  # the budget was reached after the restart
    spent = sum((row["cost_usd"] for row in rows), Decimal(0))
    worst_call = max(row["cost_usd"] for row in rows)
    assert spent <= budget + worst_call
    counter = int(store.get(f"chatapi:budget:{key_id}:t") or 0)
    assert counter >= _micro(spent)  # never less than the ledger: errs on the operator's side
    store.close()


def test_a_redis_restart_mid_minute_does_not_start_the_rate_window_again(
    private_redis: PrivateRedis, gw: Any, moved_clock: Clock
) -> None:
    gateway = gw(master_key=MASTER, redis_url=private_redis.url, lease_seconds=LEASE_SECONDS)
    rpm = 20
    key, _ = make_key(gateway.url, rpm=rpm)
    moved_clock.to_minute_start()
    body = {"message": "hi"}

    def served(count: int) -> int:
        return sum(
            httpx.post(gateway.url + "/chat", json=body, headers=auth(key)).status_code == 200
            for _ in range(count)
        )

    first = served(rpm // 2)
    private_redis.stop()
    private_redis.start()  # the minute's count is gone from Redis
    second = served(rpm)
    assert first == rpm // 2
    # Not rpm + rpm / 2: the window goes on from where it was. (Seen: 20, sometimes 21; the
    # extra one is a hit racing the restart, not yet explained.)
    assert rpm <= first + second <= rpm + 2
