"""Rate limits per key: in one process, shared through Redis, and when Redis goes away."""

from __future__ import annotations

import re
import time
from decimal import Decimal

import httpx

from tests.clock import Clock
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.keys.conftest import MASTER, PrivateRedis, RedisPlace, auth, make_key
from tests.servers import ServerThread


def _chat(base_url: str, key: str, **extra: object) -> httpx.Response:
    return httpx.post(base_url + "/chat", json={"message": "hi", **extra}, headers=auth(key))


def test_requests_per_minute_on_both_dialects(
    gateway_factory: GatewayFactory, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, _ = make_key(server.url, rpm=4)
    moved_clock.to_minute_start()
    ok = [_chat(server.url, secret) for _ in range(2)]
    ok += [
        httpx.post(
            server.url + "/v1/chat/completions",
            headers=auth(secret),
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in ok] == [200] * 4
    assert ok[0].headers["x-ratelimit-limit-requests"] == "4"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "3"
    refused = _chat(server.url, secret)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "4 requests a minute" in refused.json()["error"]
    v1 = httpx.post(
        server.url + "/v1/chat/completions",
        headers=auth(secret),
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert v1.status_code == 429 and v1.json()["error"]["code"] == "rate_limit_exceeded"
    # the master key is not limited
    assert _chat(server.url, MASTER).status_code == 200
    moved_clock.to_minute_start()  # the next minute: a fresh window
    renewed = _chat(server.url, secret)
    assert renewed.status_code == 200
    assert renewed.headers["x-ratelimit-remaining-requests"] == "3"


def test_tokens_per_minute(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, _ = make_key(server.url, tpm=100)
    moved_clock.to_minute_start()
    # each call: ~8 prompt tokens estimated + 40 max_tokens reserved, then 7 + 12 real tokens
    statuses = [_chat(server.url, secret, max_tokens=40).status_code for _ in range(8)]
    assert statuses[:2] == [200, 200]
    assert 429 in statuses
    hits_when_refused = fake.hits
    assert hits_when_refused == statuses.count(200)
    assert statuses.count(200) <= 100 // 19 + 1


def test_two_replicas_sharing_redis_hold_one_limit(
    gateway_factory: GatewayFactory, shared_redis: RedisPlace, moved_clock: Clock
) -> None:
    settings = {
        "master_key": MASTER,
        "redis_url": shared_redis.url,
        "redis_prefix": shared_redis.prefix,
    }
    one = gateway_factory(**settings)
    two = gateway_factory(**settings)
    secret, _ = make_key(one.url, rpm=6)
    moved_clock.to_minute_start()
    statuses = [_chat(server.url, secret).status_code for server in (one, two) * 6]
    assert statuses.count(200) == 6
    assert statuses.count(429) == 6


def _one_of_two_replicas(
    gateway_factory: GatewayFactory, private_redis: PrivateRedis, moved_clock: Clock
) -> tuple[ServerThread, str, str]:
    """A replica (of two) on a Redis the test may stop, a key with rpm 6 and a budgeted one
    that has made a call; at the start of a minute."""
    server = gateway_factory(
        master_key=MASTER,
        redis_url=private_redis.url,
        replicas=2,
        prices={"gpt-4o-mini": (Decimal(1), Decimal(1))},
    )
    limited, _ = make_key(server.url, rpm=6)
    budgeted, _ = make_key(server.url, budget_usd=10)
    moved_clock.to_minute_start()
    assert _chat(server.url, budgeted).status_code == 200
    return server, limited, budgeted


def test_redis_gone_falls_back_to_each_replicas_share_and_budgets_fail_closed(
    gateway_factory: GatewayFactory, private_redis: PrivateRedis, moved_clock: Clock
) -> None:
    server, limited, budgeted = _one_of_two_replicas(gateway_factory, private_redis, moved_clock)
    private_redis.stop()
    # requests: this replica's share of 6 with 2 replicas is 3
    statuses = [_chat(server.url, limited).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    # money: never guessed
    refused = _chat(server.url, budgeted)
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert "Try again" in refused.json()["error"]
    private_redis.start()
    deadline = time.monotonic() + 5
    while _chat(server.url, budgeted).status_code != 200:
        assert time.monotonic() < deadline, "budgets did not recover within 5 s of Redis"
        time.sleep(0.2)


def test_a_hung_redis_costs_one_timeout_not_one_per_limit_on_every_request(
    gateway_factory: GatewayFactory,
    private_redis: PrivateRedis,
    fake: FakeOpenAI,
    moved_clock: Clock,
) -> None:
    """Redis that stops answering (a hung host, no reset): the first call waits out one
    timeout (2 s), then every call falls back at once until Redis answers again. Before,
    every call waited a timeout for each thing that asked Redis: 4 s for a master-key call,
    8 s for a client key's."""
    server, limited, budgeted = _one_of_two_replicas(gateway_factory, private_redis, moved_clock)
    assert _chat(server.url, limited).status_code == 200

    def timed(key: str) -> tuple[int, float]:
        started = time.monotonic()
        response = httpx.post(
            server.url + "/chat", json={"message": "hi"}, headers=auth(key), timeout=30
        )
        return response.status_code, time.monotonic() - started

    with private_redis.hung():
        first = timed(limited)
        assert first[0] == 200 and first[1] < 4, first  # one timeout at most
        hits = fake.hits
        after = [timed(key) for key in (limited, MASTER, budgeted, MASTER, limited)]
        # this replica's share of 6 is 3: one counted before, then two more
        assert [status for status, _ in after] == [200, 200, 503, 200, 429], after
        assert max(seconds for _, seconds in after) < 1, after  # nobody waits on Redis
        assert fake.hits == hits + 3  # the budget is never guessed: nothing of its reached OpenAI
    deadline = time.monotonic() + 5
    while _chat(server.url, budgeted).status_code != 200:
        assert time.monotonic() < deadline, "budgets did not come back within 5 s of Redis"
        time.sleep(0.2)


RESET = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")  # OpenAI's "1s", "6m0s", "120ms"


def test_every_answer_to_a_limited_key_carries_openais_rate_limit_headers(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, _ = make_key(server.url, rpm=6, tpm=10_000)
    moved_clock.to_minute_start()
    v1 = server.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    fake.queue(Plan(), Plan(), Plan(), Plan(status=500))
    answers = [
        httpx.post(v1, json={"messages": messages}, headers=auth(secret)),
        httpx.post(v1, json={"messages": messages, "stream": True}, headers=auth(secret)),
        _chat(server.url, secret),
        httpx.post(v1, json={"messages": messages}, headers=auth(secret)),  # upstream 500
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 502]
    answers += [_chat(server.url, secret) for _ in range(3)]  # the 7th is refused
    assert answers[-1].status_code == 429
    assert answers[-1].json()["error"].startswith("This key is limited to 6 requests")
    for response in answers:
        # A refusal by the request limit is decided before tokens are counted.
        kinds = ("requests",) if response.status_code == 429 else ("requests", "tokens")
        for kind in kinds:
            assert response.headers[f"x-ratelimit-limit-{kind}"]
            assert int(response.headers[f"x-ratelimit-remaining-{kind}"]) >= 0
            assert RESET.match(response.headers[f"x-ratelimit-reset-{kind}"]), response.headers
    assert answers[0].headers["x-ratelimit-limit-requests"] == "6"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "5"
    assert answers[0].headers["x-ratelimit-limit-tokens"] == "10000"
    assert answers[-1].headers["x-ratelimit-remaining-requests"] == "0"


def test_a_token_limit_refusal_is_type_tokens(
    gateway_factory: GatewayFactory, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER)
    secret, _ = make_key(server.url, tpm=50)
    moved_clock.to_minute_start()
    for _ in range(5):
        response = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40},
            headers=auth(secret),
        )
        if response.status_code != 200:
            break
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert RESET.match(response.headers["x-ratelimit-reset-tokens"])
