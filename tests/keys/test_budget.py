"""Money budgets: reserved at the worst case before the call, settled after, never overspent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from chat_api import cli
from tests.clock import Clock
from tests.conftest import GatewayFactory
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.keys.conftest import MASTER, RedisPlace, auth, make_key

# Expensive prices make a few calls cost real money: $0.001 a token.
PRICES = {"gpt-4o-mini": (Decimal(1000), Decimal(1000))}
ONE_CALL = Decimal("0.001") * (7 + len(DEFAULT_TEXT.split(" ")))  # the fake's usage
WORST_CALL = Decimal("0.06")  # {"message": "hi", "max_tokens": 20}: its prompt's bound and 20


def _fire(base_url: str, key: str, count: int) -> list[httpx.Response]:
    def call(_: int) -> httpx.Response:
        return httpx.post(
            base_url + "/chat",
            json={"message": "hi", "max_tokens": 20},
            headers=auth(key),
            timeout=30,
        )

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))


@pytest.mark.parametrize(
    "shared",
    [pytest.param(False, id="in-process"), pytest.param(True, id="redis", marks=pytest.mark.redis)],
)
def test_fifty_concurrent_calls_never_overspend(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, shared: bool, request: pytest.FixtureRequest
) -> None:
    settings: dict[str, object] = {"master_key": MASTER, "prices": PRICES}
    if shared:
        place: RedisPlace = request.getfixturevalue("shared_redis")
        settings |= {"redis_url": place.url, "redis_prefix": place.prefix}
    server = gateway_factory(**settings)
    budget = Decimal("0.1")
    secret, key_id = make_key(server.url, budget_usd=str(budget), max_in_flight=50)
    fake.queue(*[Plan(delay_before_headers=0.3) for _ in range(50)])
    responses = _fire(server.url, secret, 50)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 50
    assert ok and refused
    assert all("left of its $0.1 budget" in r.json()["error"] for r in refused)
    assert all("retry-after" not in r.headers for r in refused)  # a total budget never renews
    assert _spent(server.url, key_id) <= budget
    assert fake.hits == len(ok)
    # What in-flight reservations held back is still there to spend, one call at a time.
    calls = len(ok)
    while _fire(server.url, secret, 1)[0].status_code == 200:
        calls += 1
        assert calls < 50
    spent = _spent(server.url, key_id)
    assert budget - WORST_CALL <= spent <= budget
    assert fake.hits == calls


def _spent(base_url: str, key_id: str) -> Decimal:
    usage = httpx.get(
        base_url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER)
    ).json()
    return Decimal(str(usage["totals"]["cost_usd"]))


def test_budget_shows_in_usage_and_renews_by_period(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, moved_clock: Clock
) -> None:
    server = gateway_factory(master_key=MASTER, prices=PRICES)
    secret, _ = make_key(server.url, budget_usd="0.05", budget_period="daily")
    ask = {"message": "hi", "max_tokens": 10}
    statuses = [
        httpx.post(server.url + "/chat", json=ask, headers=auth(secret)).status_code
        for _ in range(5)
    ]
    assert statuses.count(200) >= 1 and statuses[-1] == 429
    refused = httpx.post(server.url + "/chat", json=ask, headers=auth(secret))
    assert refused.status_code == 429 and "renews in" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1  # a daily budget: waiting helps
    mine = httpx.get(server.url + "/usage", headers=auth(secret)).json()
    budget = mine["budget"]
    assert budget["limit_usd"] == 0.05 and budget["period"] == "daily"
    assert budget["spent_usd"] == pytest.approx(float(ONE_CALL) * statuses.count(200))
    assert budget["remaining_usd"] == pytest.approx(max(0, 0.05 - budget["spent_usd"]))
    assert 0 < budget["renews_in_seconds"] <= 86_400
    moved_clock.to_next_day()  # a new day: the daily budget is whole again
    assert httpx.post(server.url + "/chat", json=ask, headers=auth(secret)).status_code == 200
    renewed = httpx.get(server.url + "/usage", headers=auth(secret)).json()["budget"]
    assert renewed["spent_usd"] == pytest.approx(float(ONE_CALL))


def test_a_spent_total_budget_says_waiting_will_not_help(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    server = gateway_factory(master_key=MASTER, prices=PRICES)
    # The call's worst case ($0.049: its prompt's bound and 11 tokens) fits once, not twice.
    secret, _ = make_key(server.url, budget_usd="0.06", budget_period="total")
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 11,
        "messages": [{"role": "user", "content": "hi"}],
    }
    url = server.url + "/v1/chat/completions"
    assert httpx.post(url, json=body, headers=auth(secret)).status_code == 200
    refused = httpx.post(url, json=body, headers=auth(secret))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "renew" not in error["message"] and "left of its $0.06 budget" in error["message"]
    assert "retry-after" not in refused.headers
    assert refused.headers["x-should-retry"] == "false"  # the SDKs would retry in vain
    assert fake.hits == 1


def test_one_spend_reads_the_same_everywhere(
    gateway_factory: GatewayFactory,
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 9 prompt tokens at $1.50 a million: $0.0000135, which 6 decimals rounded two ways.
    prices = {"gpt-4o-mini": (Decimal("1.5"), Decimal(0))}
    server = gateway_factory(master_key=MASTER, prices=prices)
    secret, key_id = make_key(server.url, budget_usd="1", budget_period="daily")
    fake.queue(Plan(usage={"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}))
    assert (
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 200
    )
    mine = httpx.get(server.url + "/usage", headers=auth(secret)).json()
    admin = httpx.get(
        server.url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER)
    ).json()
    shown = {
        mine["totals"]["cost_usd"],
        mine["by_model"][0]["cost_usd"],
        mine["by_day"][0]["cost_usd"],
        mine["budget"]["spent_usd"],
        admin["totals"]["cost_usd"],
    }
    assert shown == {0.0000135}
    budget = mine["budget"]
    assert Decimal(repr(budget["spent_usd"])) + Decimal(repr(budget["remaining_usd"])) == 1
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/gateway.db")
    assert cli.main(["usage", "--key", key_id]) == 0
    assert "0.0000135" in capsys.readouterr().out


@pytest.mark.parametrize("period", ["daily", "monthly", "total", None])
def test_a_period_worked_out_once_says_what_it_says_worked_out_each_time(
    period: str | None,
) -> None:
    """Admission keeps a period's bounds until it ends: readings across a month's end agree."""
    from datetime import UTC, datetime

    from chat_api.limits.budgets import Periods, period_bounds

    periods = Periods()
    start = datetime(2026, 1, 31, 23, 59, 58, tzinfo=UTC).timestamp()
    for now in (start, start + 1.5, start + 2.0, start + 2.5, start + 86_400, start + 3.0):
        expected = period_bounds(period, datetime.fromtimestamp(now, UTC))
        bucket, begins, reset_in = periods.bounds(period, now)
        assert (bucket, begins) == expected[:2]
        assert reset_in == pytest.approx(expected[2], abs=1e-3)
