"""Three gateway processes sharing one PostgreSQL and one Redis, as in production."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from tests.clock import avoid_minute_edge
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.keys.conftest import MASTER, RedisPlace, auth, make_key
from tests.ops.conftest import GatewayProcess, Spawn

pytestmark = pytest.mark.slow  # three gateway processes
ONE_CALL = Decimal("0.001") * (7 + len(DEFAULT_TEXT.split(" ")))  # at the prices below


@pytest.fixture
def replicas(
    postgres_url: str, shared_redis: RedisPlace, spawn: Spawn, fake: FakeOpenAI, upstream_url: str
) -> list[GatewayProcess]:
    env = {
        "OPENAI_API_KEY": fake.api_key,
        "OPENAI_BASE_URL": upstream_url,
        "CHAT_API_MASTER_KEY": MASTER,
        "CHAT_API_DATABASE_URL": postgres_url,
        "CHAT_API_REDIS_URL": shared_redis.url,
        "CHAT_API_REDIS_PREFIX": shared_redis.prefix,
        "CHAT_API_REPLICAS": "3",
        "CHAT_API_PRICES": '{"gpt-4o-mini": [1000, 1000]}',
    }
    first = spawn(env)  # migrates the schema alone; the others find it done
    return [first, *ThreadPoolExecutor(2).map(lambda _: spawn(env), range(2))]


def _spread(replicas: list[GatewayProcess], key: str, count: int) -> list[int]:
    def call(index: int) -> int:
        url = replicas[index % len(replicas)].url
        return httpx.post(
            url + "/chat", json={"message": "hi", "max_tokens": 20}, headers=auth(key), timeout=30
        ).status_code

    with ThreadPoolExecutor(max_workers=30) as pool:
        return list(pool.map(call, range(count)))


def test_three_replicas_behave_as_one(replicas: list[GatewayProcess], fake: FakeOpenAI) -> None:
    one, two, three = replicas

    # The combined rate limit holds (within 2 %): not three times it.
    limited, _ = make_key(one.url, rpm=60)
    avoid_minute_edge(margin=6)  # the 100 calls below take a second or two
    statuses = _spread(replicas, limited, 100)
    assert abs(statuses.count(200) - 60) <= 1.2
    assert statuses.count(429) == 100 - statuses.count(200)

    # A budget is not overspent by more than one request, wherever the calls land.
    budget = Decimal("0.2")
    spender, spender_id = make_key(two.url, budget_usd=str(budget))
    fake.queue(*[Plan(delay_before_headers=0.2) for _ in range(60)])
    statuses = _spread(replicas, spender, 60)
    assert 200 in statuses and 429 in statuses
    for replica in replicas:  # each replica writes its own queued rows
        httpx.get(replica.url + "/usage", headers=auth(MASTER))
    usage = httpx.get(
        three.url + "/admin/usage", params={"key_id": spender_id}, headers=auth(MASTER)
    ).json()
    assert Decimal(str(usage["totals"]["cost_usd"])) <= budget + ONE_CALL

    # Every call that reached the upstream has its ledger row.
    everyone = httpx.get(one.url + "/admin/usage", headers=auth(MASTER)).json()
    assert everyone["totals"]["requests"] == fake.hits

    # Revoking on one replica is enforced by the others at once.
    revocable, revocable_id = make_key(one.url)
    assert (
        httpx.post(two.url + "/chat", json={"message": "hi"}, headers=auth(revocable)).status_code
        == 200
    )
    assert (
        httpx.delete(three.url + f"/admin/keys/{revocable_id}", headers=auth(MASTER)).status_code
        == 200
    )
    for replica in replicas:
        assert (
            httpx.post(
                replica.url + "/chat", json={"message": "hi"}, headers=auth(revocable)
            ).status_code
            == 401
        )

    # A replica killed mid-stream: its client gets a clean error, the others keep serving.
    fake.plans.clear()  # plans the refused budget calls never took
    fake.queue(Plan(text=" ".join(["slow"] * 100), chunk_interval=0.1))
    outcome: dict[str, object] = {}
    started = threading.Event()

    def read() -> None:
        try:
            with httpx.stream(
                "POST",
                three.url + "/chat/stream",
                json={"message": "hi"},
                headers=auth(MASTER),
                timeout=10,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        started.set()
                        outcome["last"] = line
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(10)
    three.signal(signal.SIGKILL)
    reader.join(10)
    assert isinstance(outcome.get("error"), httpx.RemoteProtocolError | httpx.ReadError)
    assert '"done"' not in str(outcome.get("last"))  # never a silent, truncated "success"
    assert fake.last().closed_early.wait(5)  # the dead replica's upstream call was closed
    for replica in (one, two):
        assert (
            httpx.post(
                replica.url + "/chat", json={"message": "still here"}, headers=auth(MASTER)
            ).status_code
            == 200
        )
