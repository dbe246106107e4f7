"""Keys on with Redis: a script step to admit a call, one to settle it, in shared script runs.

What a user or an operator would notice: a key revoked on one replica is
refused on the next request on another, whatever the route; a call costs
Redis one to three script runs, not eight commands, and calls at the same
moment share runs; what a refused call asked for is not left counted; a
step that fails fails alone; money still holds when many calls settle
together; and a client that leaves while its admission is on its way
leaves nothing reserved behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import GatewayFactory
from tests.fakes.billing_upstream import Behaviour, BillingUpstream
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.faults.storage import TcpProxy
from tests.keys.conftest import MASTER, PrivateRedis, RedisPlace, auth, make_key

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/chat", {"message": "hi"}),
    ("/chat/stream", {"message": "hi"}),
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
]


def _call(url: str, secret: str, path: str, body: dict[str, Any]) -> int:
    return httpx.post(url + path, json=body, headers=auth(secret), timeout=30).status_code


def _replicas(
    gateway_factory: GatewayFactory,
    postgres_url: str,
    redis_url: str,
    prefix: str,
    count: int,
    upstream: tuple[BillingUpstream, str] | None = None,
) -> list[Any]:
    shared = {"redis_url": redis_url, "redis_prefix": prefix, "database_url": postgres_url}
    if upstream is not None:  # the fake that bills as OpenAI does, for the money assertions
        shared |= {"openai_base_url": upstream[1], "openai_api_key": upstream[0].api_key}
    return [gateway_factory(master_key=MASTER, **shared) for _ in range(count)]


def test_a_revoked_key_is_refused_by_another_replica_on_every_call_route(
    postgres_url: str, shared_redis: RedisPlace, gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    one, two = _replicas(gateway_factory, postgres_url, shared_redis.url, shared_redis.prefix, 2)
    secret, key_id = make_key(one.url)
    for path, body in CALLS:  # every route has the key cached on `two` now
        assert _call(two.url, secret, path, body) == 200, path
    before = fake.hits
    assert httpx.delete(one.url + f"/admin/keys/{key_id}", headers=auth(MASTER)).status_code == 200
    for path, body in CALLS:
        assert _call(two.url, secret, path, body) == 401, path
    assert httpx.get(two.url + "/v1/models", headers=auth(secret)).status_code == 401
    assert fake.hits == before  # nothing of the revoked key's reached OpenAI


def test_another_key_changing_costs_a_cached_key_nothing_but_one_read(
    postgres_url: str, shared_redis: RedisPlace, gateway_factory: GatewayFactory
) -> None:
    (gateway,) = _replicas(gateway_factory, postgres_url, shared_redis.url, shared_redis.prefix, 1)
    secret, _ = make_key(gateway.url, rpm=100)
    assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
    _, other = make_key(gateway.url)
    assert httpx.delete(gateway.url + f"/admin/keys/{other}", headers=auth(MASTER)).is_success
    for _ in range(3):  # the key set changed twice: the cached key is read again, still valid
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200


def _quiet(client: redis.Redis, key_id: str, prefix: str = "t:") -> None:
    """Wait until every call of the key settled and its lease is gone (its row written)."""
    deadline = time.monotonic() + 10
    while client.zcard(f"{prefix}inflight:{key_id}") or client.zcard(f"{prefix}leases"):
        assert time.monotonic() < deadline, "calls did not settle"
        time.sleep(0.05)


class _Watch:
    """The commands clients send Redis (MONITOR), without those scripts run inside it."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self.sent: list[str] = []
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._ready = threading.Event()

    def _listen(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                text = str(command["command"])
                if text == "ECHO end-of-watch":
                    return
                if command.get("client_type") != "lua":
                    self.sent.append(text.split(" ", 1)[0].upper())

    def __enter__(self) -> _Watch:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.1)  # MONITOR is on before the first command is sent
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.echo("end-of-watch")
        self._thread.join(10)


def test_a_call_costs_redis_a_few_script_runs_and_a_refusal_takes_nothing(
    postgres_url: str, private_redis: PrivateRedis, gateway_factory: GatewayFactory
) -> None:
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1)
    secret, key_id = make_key(
        gateway.url, rpm=1000, tpm=1_000_000, budget_usd="0.05", max_in_flight=4
    )
    client = redis.Redis.from_url(private_redis.url)
    for _ in range(3):  # warm: the key cached, the budget seeded, the scripts loaded
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
    _quiet(client, key_id)
    calls = 20
    with _Watch(private_redis.url) as watch:
        for _ in range(calls):
            assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
        _quiet(client, key_id)
    # Admission and settlement are a step each, the lease's cleanup once the ledger wrote
    # the row one more (per batch of rows): at most three script runs a call, one when
    # the steps after a call ride with the next admission. Besides them only the watch's
    # own ZCARDs, the holds' renewal and the once-a-second check that Redis kept its data.
    scripts = watch.sent.count("EVALSHA")
    others = [name for name in watch.sent if name not in ("EVALSHA", "ZCARD")]
    assert calls <= scripts <= 3 * calls, watch.sent
    assert len(others) <= 10, others  # no command per limit any more

    budget = f"t:budget:{key_id}:t"
    total = int(client.get(budget) or 0)
    in_flight = client.zcard(f"t:inflight:{key_id}")
    assert in_flight == 0  # every slot given back
    # A call refused by its budget takes nothing: not a request, not a slot, not money.
    huge = {**CHAT, "max_tokens": 16_000, "n": 8}  # up to $0.077 on a $0.05 budget
    response = httpx.post(gateway.url + "/v1/chat/completions", json=huge, headers=auth(secret))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_quota"
    assert int(client.get(budget) or 0) == total
    assert client.zcard(f"t:inflight:{key_id}") == 0
    assert not client.keys("t:lease:*")


def test_master_key_calls_take_their_leases_in_the_shared_script_runs(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    upstream: tuple[BillingUpstream, str],
) -> None:
    """The operator's own calls have no limits but a lease (a replica's death loses no
    row), taken and settled in the runs shared with the calls of the moment, not each in
    two runs of its own (measured: about a quarter of the gateway's CPU a call less)."""
    upstream[0].behaviour = Behaviour(write=5)
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1, upstream)
    client = redis.Redis.from_url(private_redis.url)
    assert _call(gateway.url, MASTER, "/v1/chat/completions", CHAT) == 200  # warm
    _quiet(client, "")
    before = httpx.get(gateway.url + "/usage", headers=auth(MASTER)).json()["totals"]
    calls = 64
    with _Watch(private_redis.url) as watch, ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(
            pool.map(
                lambda _: _call(gateway.url, MASTER, "/v1/chat/completions", CHAT), range(calls)
            )
        )
        _quiet(client, "")
    assert statuses == [200] * calls
    assert watch.sent.count("EVALSHA") < 1.5 * calls, watch.sent
    assert "ZADD" not in watch.sent  # no lease written on its own
    assert not client.keys("t:lease:*")  # every lease gone: its row was written
    deadline = time.monotonic() + 10
    while True:
        after = httpx.get(gateway.url + "/usage", headers=auth(MASTER)).json()["totals"]
        if after["requests"] - before["requests"] == calls:  # one row a call
            break
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.1)


def test_calls_at_the_same_time_share_script_runs(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    upstream: tuple[BillingUpstream, str],
) -> None:
    fake = upstream[0]
    fake.behaviour = Behaviour(write=5)
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1, upstream)
    secret, key_id = make_key(gateway.url, rpm=10_000, budget_usd="1", max_in_flight=64)
    client = redis.Redis.from_url(private_redis.url)
    assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200  # warm
    _quiet(client, key_id)
    budget = f"t:budget:{key_id}:t"
    calls, billed, counted = 64, fake.biller.total, int(client.get(budget) or 0)
    with _Watch(private_redis.url) as watch, ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(
            pool.map(
                lambda _: _call(gateway.url, secret, "/v1/chat/completions", CHAT), range(calls)
            )
        )
        _quiet(client, key_id)
    assert statuses == [200] * calls
    # Alone, a call is one to three script runs; calls that overlap go in the same ones.
    assert watch.sent.count("EVALSHA") < 2 * calls, watch.sent
    # The batch is one script run, not one way to skip a limit: everything was counted.
    spent = int(client.get(budget) or 0) - counted
    assert spent >= int((fake.biller.total - billed) * 1_000_000) > 0
    counted = sum(int(v or 0) for v in client.mget(client.keys(f"t:rpm:{key_id}:*")))
    assert counted >= calls  # every request counted (in whichever minutes they fell)


async def _batch_answers(url: str) -> list[Any]:
    from redis.asyncio import Redis

    from chat_api.limits.shared_admission import Batched

    client = Redis.from_url(url)
    batch = Batched(client)
    try:
        await client.hset("t:broken", "not", "a counter")
        await client.zadd("t:inflight:k", {"call_a": 1, "call_b": 1})
        await client.set("t:tpm", 100)
        for call in ("call_a", "call_b"):  # both admitted: their leases are there
            await client.hset(f"t:lease:{call}", "estimate", "{}")
        # One step of the batch fails (its key holds the wrong kind of value): the
        # others still run and answer, each caller gets its own answer.
        broken = batch.submit(
            "release",
            ["t:inflight:k", "t:broken", "t:x", "t:lease:call_b", "t:z"],
            ["call_b", "1", "0"],
        )
        release_a = ["t:inflight:k", "t:tpm", "t:x", "t:lease:call_a", "t:z"], ["call_a", "30", "0"]
        fine = batch.submit("release", *release_a)
        answers: list[Any] = list(await asyncio.gather(broken, fine, return_exceptions=True))
        answers.append(await client.zscore("t:inflight:k", "call_a"))
        # Undoing twice undoes once: the tokens given back are not given back again.
        answers.append(await batch.submit("release", *release_a))
        answers.append(int(await client.get("t:tpm") or 0))
        await client.script_flush()  # Redis lost its scripts (a restart): loaded again
        answers.append(
            await batch.submit("release", ["t:a", "t:b", "t:c", "t:d", "t:e"], ["c", "1", "0"])
        )
        return answers
    finally:
        await batch.close()
        await client.aclose()


def test_one_failing_step_of_a_batch_fails_alone(private_redis: PrivateRedis) -> None:
    from redis.exceptions import ResponseError

    broken, fine, slot, again, tokens, after_flush = asyncio.run(_batch_answers(private_redis.url))
    assert isinstance(broken, ResponseError) and "WRONGTYPE" in str(broken)
    assert fine == 1 and slot is None  # the other call's slot was given back
    assert again == 0 and tokens == 70  # 100 - 30, once
    assert after_flush == 0  # nothing was admitted under that id: nothing to undo


async def _runs_for_steps(url: str) -> tuple[int, int, list[Any]]:
    from redis.asyncio import Redis

    from chat_api.limits.shared_admission import Batched

    client = Redis.from_url(url)
    batch = Batched(client)

    async def runs() -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        await batch.submit("release", ["t:a", "t:b", "t:c", "t:d", "t:e"], ["c0", "1", "0"])
        before = await runs()
        # What comes after a call (here a release), then the next call's admission (one
        # with no limits: it only writes its lease): one script run for both.
        after = batch.submit("release", ["t:a", "t:b", "t:c", "t:d", "t:e"], ["c1", "1", "0"])
        now = time.time()
        lease = [repr(now + 30), "60", "call_1", "estimate", "{}"]
        keys = ["t:v", "t:r", "t:i", "t:t", "t:v", "t:lease:call_1", "t:leases", "t:epoch"]
        admitted = batch.submit(
            "admit",
            keys,
            ["", "", "", repr(now), repr(now + 1), "call_1", "3", "1", "", "0", "", "", *lease],
        )
        answers: list[Any] = list(await asyncio.gather(after, admitted))
        together = await runs() - before
        # Alone, a step after a call still goes, a millisecond later.
        answers.append(
            await asyncio.wait_for(
                batch.submit("release", ["t:a", "t:b", "t:c", "t:d", "t:e"], ["c2", "1", "0"]), 1
            )
        )
        return together, await runs() - before - together, answers
    finally:
        await batch.close()
        await client.aclose()


def test_the_steps_after_a_call_ride_with_the_next_admission(private_redis: PrivateRedis) -> None:
    together, alone, answers = asyncio.run(_runs_for_steps(private_redis.url))
    assert together == 1 and alone == 1
    assert answers == [0, [1, 0, 0, "0"], 0]  # the releases had nothing to undo


def _admit_step() -> tuple[list[str], list[str]]:
    """The keys and arguments of an admission step for `call_1` with no limits, only its lease."""
    now = time.time()
    lease = [repr(now + 30), "60", "call_1", "estimate", "{}"]
    keys = ["t:v", "t:r", "t:i", "t:t", "t:v", "t:lease:call_1", "t:leases", "t:epoch"]
    args = ["", "", "", repr(now), repr(now + 1), "call_1", "3", "1", "", "0", "", "", *lease]
    return keys, args


async def _admission_behind_a_slow_run(url: str) -> tuple[list[str], float]:
    from redis.asyncio import Redis

    from chat_api.limits.shared_admission import Batched

    client = Redis.from_url(url)
    batch = Batched(client)
    write = batch._write
    order: list[str] = []
    on_its_way = asyncio.Event()

    def slow_after_calls(line: Any, command: list[bytes]) -> None:
        if all(step[0] != "admit" for step in line.batch):  # a slow way to Redis for this run
            asyncio.get_running_loop().call_later(0.3, write, line, command)
            on_its_way.set()
        else:
            write(line, command)

    batch._write = slow_after_calls  # type: ignore[method-assign]
    release = ["t:a", "t:b", "t:c", "t:d", "t:e"]
    try:
        first = batch.submit("release", release, ["c1", "1", "0"], idle=True)
        await asyncio.wait_for(on_its_way.wait(), 5)  # connected, and the run sent
        second = batch.submit("release", release, ["c2", "1", "0"], idle=True)
        keys, args = _admit_step()
        started = time.monotonic()
        admitted = batch.submit("admit", keys, args)
        for name, step in (("first", first), ("second", second), ("admit", admitted)):
            step.add_done_callback(lambda _, name=name: order.append(name))
        assert await admitted == [1, 0, 0, "0"]
        waited = time.monotonic() - started
        await asyncio.gather(first, second)
        return order, waited
    finally:
        await batch.close()
        await client.aclose()


def test_an_admission_does_not_wait_behind_a_run_of_settlements(
    private_redis: PrivateRedis,
) -> None:
    # A call's admission goes at once in a run of its own, even while the run before,
    # with only what comes after other calls, is still on its way; the steps after calls
    # still go one run at a time, in the order they were asked.
    order, waited = asyncio.run(_admission_behind_a_slow_run(private_redis.url))
    assert order == ["admit", "first", "second"]
    assert waited < 0.2


def test_many_calls_settling_together_hold_the_budget_and_leave_one_row_each(
    postgres_url: str,
    shared_redis: RedisPlace,
    gateway_factory: GatewayFactory,
    upstream: tuple[BillingUpstream, str],
) -> None:
    fake = upstream[0]
    fake.behaviour = Behaviour(write=5)  # answers far below their worst case
    place = shared_redis
    one, two = _replicas(gateway_factory, postgres_url, place.url, place.prefix, 2, upstream)
    budget = Decimal("0.0002")  # about 40 calls at what they cost, 1 at its worst case
    secret, key_id = make_key(one.url, budget_usd=str(budget), max_in_flight=64)
    body = {**CHAT, "max_tokens": 200}

    def go(i: int) -> int:
        return _call((one, two)[i % 2].url, secret, "/v1/chat/completions", body)

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(go, range(200)))
    assert statuses.count(200) >= 1 and 429 in statuses and set(statuses) <= {200, 429}
    assert fake.biller.total <= budget  # what OpenAI billed never passed the budget
    deadline = time.monotonic() + 15
    while True:
        usage = httpx.get(
            one.url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER)
        ).json()["totals"]
        if usage["requests"] >= statuses.count(200) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert usage["requests"] == statuses.count(200) == fake.calls  # one row per upstream call
    assert Decimal(str(usage["cost_usd"])) >= fake.biller.total


def test_a_client_that_leaves_while_admission_is_on_its_way_leaves_nothing_reserved(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
) -> None:
    """The script runs in Redis whatever the client does: what it took is given back."""
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1)
    secret, key_id = make_key(gateway.url, budget_usd="1", max_in_flight=100)
    assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
    client = redis.Redis.from_url(private_redis.url)
    budget = f"t:budget:{key_id}:t"
    _quiet(client, key_id)
    settled_total = int(client.get(budget) or 0)
    hits = fake.hits

    async def leave_while_redis_is_slow() -> None:
        # Redis holds every script for 1.5 s; the clients give up after 0.5 s.
        client.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        async with httpx.AsyncClient(base_url=gateway.url, headers=auth(secret)) as http:

            async def one() -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    body = {**CHAT, "max_tokens": 4000}
                    await http.post("/v1/chat/completions", json=body, timeout=0.5)

            await asyncio.gather(*(one() for _ in range(20)))

    paused_at = time.monotonic()
    asyncio.run(leave_while_redis_is_slow())
    time.sleep(max(0.0, paused_at + 1.7 - time.monotonic()))  # the held scripts have run
    client.set("t:after-the-pause", 1)
    _quiet(client, key_id)  # every slot back, every lease gone (none left for the reaper)
    assert int(client.get(budget) or 0) == settled_total  # nothing reserved is left behind
    assert fake.hits == hits  # and none of them reached OpenAI


@pytest.mark.slow
def test_an_admission_whose_answer_is_lost_leaves_nothing_reserved(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    upstream: tuple[BillingUpstream, str],
) -> None:
    """Redis runs the scripts past the gateway's 2 s timeout: the answers never come back.

    The calls go the step way meanwhile (still counted, still within budget);
    an admission that did run once Redis went on is undone, so no worst case
    stays reserved and no lease is left for the reaper to bill.
    """
    fake = upstream[0]
    fake.behaviour = Behaviour(write=5)
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1, upstream)
    secret, key_id = make_key(gateway.url, budget_usd="1", max_in_flight=100)
    assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
    client = redis.Redis.from_url(private_redis.url)
    budget = f"t:budget:{key_id}:t"
    _quiet(client, key_id)
    before, billed = int(client.get(budget) or 0), fake.biller.total

    # A script that keeps Redis busy for about 3 s: what the gateway sends meanwhile is read,
    # and run, once it is done; by then the gateway gave up waiting for the answers.
    busy = "local t = redis.call('TIME') while redis.call('TIME')[1] - t[1] < 3 do end return 1"
    started = time.time()
    time.sleep(max(0.0, 1 - (started % 1)))  # at the start of a second: 2 to 3 s busy
    hold = threading.Thread(target=lambda: redis.Redis.from_url(private_redis.url).eval(busy, 0))
    hold.start()
    time.sleep(0.05)
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(
            pool.map(lambda _: _call(gateway.url, secret, "/v1/chat/completions", CHAT), range(8))
        )
    hold.join()
    assert set(statuses) <= {200, 503}, statuses
    time.sleep(0.3)
    _quiet(client, key_id)  # every slot back, every lease gone: none left for the reaper
    spent = int(client.get(budget) or 0) - before
    served = int((fake.biller.total - billed) * 1_000_000)
    assert served <= spent <= served + len(statuses)  # what was billed, rounded up; no more


@pytest.mark.slow
def test_a_burst_on_a_key_nobody_has_seen_is_not_taken_for_redis_being_away(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """250 calls at once on one replica, the key's budget counter not started yet.

    They share one start of the counter from the ledger, and whatever wants more
    Redis connections than the pool holds waits for one: before, the 101st got
    "too many connections", which read as "Redis unreachable" and sent the
    budgets of every key to 503 for a second.
    """
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1)
    secret, _ = make_key(gateway.url, budget_usd="100", max_in_flight=1000)
    count = 250

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers=auth(secret)) as http:
            calls = [
                http.post(gateway.url + "/v1/chat/completions", json=CHAT) for _ in range(count)
            ]
            return [response.status_code for response in await asyncio.gather(*calls)]

    caplog.set_level(logging.WARNING, "chat_api")
    statuses = asyncio.run(burst())
    assert statuses == [200] * count, {s: statuses.count(s) for s in set(statuses)}
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]


def test_an_answer_out_of_step_counts_its_run_as_lost() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from chat_api.limits.shared_admission import _Line

    answers: list[Any] = []
    for garbage in (b"+OK\r\n", b"$-1\r\n", b"$2\r\nok\r\n$2\r\nok\r\n"):  # none a run's answer
        line = _Line(lambda _, answer: answers.append(answer))
        line.batch = []  # a run on its way
        line.data_received(garbage)
    assert [type(answer) for answer in answers] == [RedisConnectionError] * 3


def test_a_budgeted_call_right_after_redis_returns_is_served(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
) -> None:
    """Redis down, then back: the next budgeted call is served at once.

    While Redis is down a budgeted call gets 503 (money is not guessed), and
    Redis counts as away; the first call after it returns asks it, instead of
    waiting for the once-a-second probe (seen in the cluster test as
    [503, 200, 200] when a settlement on its way noticed the restart first).
    """
    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1)
    secret, _ = make_key(gateway.url, rpm=1000, budget_usd="50", budget_period="monthly")
    for _ in range(3):
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
        private_redis.stop()
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 503
        private_redis.start()
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
    for _ in range(3):  # restarted between two calls, a settlement perhaps on its way
        private_redis.stop()
        private_redis.start()
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200


def test_a_run_on_a_connection_that_went_stale_goes_again_on_a_fresh_one(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy between the gateway and Redis forgets its connections, telling nobody.

    The gateway learns it from a reset when its next script run is sent: that
    run goes once more on a fresh connection (every step is safe to run twice),
    so the budgeted call is served, counted once, and Redis is not taken for away.
    """
    proxy = TcpProxy(private_redis.port)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        (gateway,) = _replicas(gateway_factory, postgres_url, url, "t:", 1)
        secret, key_id = make_key(gateway.url, rpm=1000, budget_usd="50")
        caplog.set_level(logging.WARNING, "chat_api")
        client = redis.Redis.from_url(private_redis.url)
        for _ in range(3):
            assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
            _quiet(client, key_id)
            proxy.forget()
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
        _quiet(client, key_id)
        window = int(time.time() // 60)
        counted = sum(int(client.get(f"t:rpm:{key_id}:{w}") or 0) for w in (window - 1, window))
        assert counted == 4  # each call counted once, the one sent twice too
        assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    finally:
        proxy.stop()


def test_an_admission_that_ran_but_could_not_be_sent_again_is_undone(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
) -> None:
    """Redis ran an admission, its answer was lost with the connection, and the fresh
    connection to send it again was refused: the call falls back (503, nothing sent to
    OpenAI), and what the lost run took is given back, not left for the reaper to bill."""
    proxy = TcpProxy(private_redis.port)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        (gateway,) = _replicas(gateway_factory, postgres_url, url, "t:", 1)
        secret, key_id = make_key(gateway.url, budget_usd="1", max_in_flight=100)
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 200
        client = redis.Redis.from_url(private_redis.url)
        budget = f"t:budget:{key_id}:t"
        _quiet(client, key_id)
        before, hits = int(client.get(budget) or 0), fake.hits
        proxy.lose_the_next_answer(b"EVALSHA", then_refuse=2)  # redis-py connects twice
        assert _call(gateway.url, secret, "/v1/chat/completions", CHAT) == 503
        _quiet(client, key_id)  # no slot, no lease left for the reaper
        assert int(client.get(budget) or 0) == before  # nothing stays reserved
        assert fake.hits == hits
    finally:
        proxy.stop()


async def _left_before_it_was_sent_again(proxy: TcpProxy) -> tuple[bool, bool]:
    from redis.asyncio import Redis

    from chat_api.limits.shared_admission import Batched

    client = Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    batch = Batched(client)
    release = ["t:i", "t:t", "t:v", "t:lease:call_1", "t:leases"]
    keys, args = _admit_step()
    undo = ["call_1", "1", "0"]  # its id, tokens and cost, as `SharedAdmission._release` sends
    undone: list[asyncio.Future[Any]] = []
    try:
        await batch.submit("release", release, ["call_0", "1", "0"], idle=True)  # it answered
        proxy.lose_the_next_answer(b"EVALSHA")
        admitted = batch.submit(
            "admit", keys, args, lambda _: undone.append(batch.submit("release", release, undo))
        )
        again = batch._again

        def and_the_caller_leaves(*what: Any) -> bool:
            sent_again = again(*what)
            admitted.cancel()  # while the fresh connection is being made
            return sent_again

        batch._again = and_the_caller_leaves  # type: ignore[method-assign]
        with contextlib.suppress(asyncio.CancelledError):
            await admitted
        for _ in range(200):  # the undoing is asked for when the run would have gone again
            if undone:
                break
            await asyncio.sleep(0.01)
        answered = bool(undone) and await asyncio.wait_for(undone[0], 5) == 1
        left = await client.exists("t:lease:call_1") or await client.zscore("t:leases", "call_1")
        return answered, bool(left)
    finally:
        await batch.close()
        await client.aclose()


def test_an_admission_whose_caller_left_before_it_was_sent_again_is_undone(
    private_redis: PrivateRedis,
) -> None:
    """Its lost run had run in Redis: the undoing is sent (it was left in the queue with
    no run to take it, and the lease for the reaper to bill)."""
    proxy = TcpProxy(private_redis.port)
    try:
        answered, lease_left = asyncio.run(_left_before_it_was_sent_again(proxy))
    finally:
        proxy.stop()
    assert answered and not lease_left


def test_the_budget_holds_while_a_proxy_keeps_forgetting_the_connections_to_redis(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    upstream: tuple[BillingUpstream, str],
) -> None:
    """Two replicas, 200 budgeted calls 32 at a time, and every 20 ms the proxy to Redis
    forgets every connection (each learns it from a reset when it next sends): runs go
    again, calls fall back, and still OpenAI bills no more than the budget, every call it
    served has one row, and nothing is left reserved or leased."""
    fake = upstream[0]
    fake.behaviour = Behaviour(write=5)
    proxy = TcpProxy(private_redis.port)
    stop = threading.Event()

    def forget_often() -> None:
        while not stop.wait(0.2):
            proxy.forget()

    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        one, two = _replicas(gateway_factory, postgres_url, url, "t:", 2, upstream)
        budget = Decimal("0.0002")
        secret, key_id = make_key(one.url, budget_usd=str(budget), max_in_flight=64)
        body = {**CHAT, "max_tokens": 200}
        forgetting = threading.Thread(target=forget_often)
        forgetting.start()
        with ThreadPoolExecutor(max_workers=32) as pool:
            statuses = list(
                pool.map(
                    lambda i: _call((one, two)[i % 2].url, secret, "/v1/chat/completions", body),
                    range(200),
                )
            )
        stop.set()
        forgetting.join()
        print({status: statuses.count(status) for status in set(statuses)}, fake.biller.total)
        assert set(statuses) <= {200, 429, 503}, statuses
        assert fake.biller.total <= budget  # what OpenAI billed never passed the budget
        _quiet(redis.Redis.from_url(private_redis.url), key_id)  # nothing reserved is left
        deadline = time.monotonic() + 15
        while True:
            usage = httpx.get(
                one.url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER)
            ).json()["totals"]
            if usage["requests"] >= fake.calls or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert usage["requests"] == statuses.count(200) == fake.calls  # one row a served call
        assert Decimal(str(usage["cost_usd"])) >= fake.biller.total
    finally:
        stop.set()
        proxy.stop()


def test_a_stop_with_redis_hung_during_a_settlement_waits_a_few_seconds_at_most(
    postgres_url: str,
    private_redis: PrivateRedis,
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
) -> None:
    """A settlement lost to Redis hanging is sent again a moment later, and again (each
    try waits out the 2 s timeout); a stop waits for that at most `STOP_WAITS`, then
    leaves the call to the reaper, instead of some 15 s of tries."""
    from chat_api.limits.admission import STOP_WAITS
    from chat_api.store.shared import SOCKET_TIMEOUT

    (gateway,) = _replicas(gateway_factory, postgres_url, private_redis.url, "t:", 1)
    assert _call(gateway.url, MASTER, "/v1/chat/completions", CHAT) == 200
    fake.queue(Plan(delay_before_headers=0.5))
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_call, gateway.url, MASTER, "/v1/chat/completions", CHAT)
        time.sleep(0.2)  # admitted (its lease taken); Redis hangs before it settles
        with private_redis.hung():
            assert answer.result() == 200
            time.sleep(2.5)  # the settlement timed out: it waits to be sent again
            started = time.monotonic()
            gateway.stop()
            took = time.monotonic() - started
    # The corrections' wait, then the batch's close waits one timeout for the run on its way.
    assert took < STOP_WAITS + SOCKET_TIMEOUT + 3, took
