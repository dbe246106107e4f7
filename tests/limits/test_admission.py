"""Money: budgets and limits hold against an upstream that bills the way OpenAI does.

Each attack a hostile client could try is a test here. The ground truth is
what the fake upstream billed (`tests/fakes/billing.py`); every test checks
it against the budget or limit, and the gateway's ledger against it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from chat_api.app import create_app
from chat_api.config import Settings
from tests.clock import Clock
from tests.fakes.billing import Biller
from tests.fakes.billing_upstream import BillingUpstream
from tests.keys.conftest import MASTER, RedisPlace, auth, make_key
from tests.servers import ServerThread

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4", "o1-mini")


@pytest.fixture
def start(upstream: tuple[BillingUpstream, str], tmp_path: Path) -> Iterator[Any]:
    fake, url = upstream
    started: list[ServerThread] = []

    def start_gateway(**overrides: Any) -> ServerThread:
        values: dict[str, Any] = {
            "openai_api_key": fake.api_key,
            "openai_base_url": url,
            "upstream_retries": 0,
            "master_key": MASTER,
            "models": MODELS,
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            **overrides,
        }
        server = ServerThread(create_app(Settings(**values))).start()
        started.append(server)
        return server

    yield start_gateway
    for server in started:
        server.stop()


def _post(url: str, key: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> int:
    try:
        return httpx.post(url + path, json=body, headers=auth(key), timeout=30).status_code
    except httpx.HTTPError:
        return 0


def _many(url: str, key: str, body: dict[str, Any], count: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: _post(url, key, body), range(count)))


def _ledger(url: str, key_id: str) -> dict[str, Any]:
    usage = httpx.get(url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER))
    totals: dict[str, Any] = usage.json()["totals"]
    return totals


def _recorded(url: str, key_id: str) -> Decimal:
    return Decimal(str(_ledger(url, key_id)["cost_usd"]))


def _assert_ledger_matches(biller: Biller, url: str, key_id: str) -> None:
    """The ledger has at least 90 % of what the upstream billed (estimates may pass it)."""
    billed = biller.total
    recorded = _recorded(url, key_id)
    assert recorded >= billed * Decimal("0.9") - Decimal("0.000001"), (recorded, billed)


def _tools(kilobytes: int) -> list[dict[str, Any]]:
    """A `tools` array of about this size: what a hostile client sends to be billed for it."""
    description = "x" * 1000
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": description,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for i in range(kilobytes)
    ]


def test_aborted_streams_with_huge_tools_are_billed_and_stop_at_the_budget(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    """40 streams one after another, 120 KB of tools each, the client leaving at once."""
    fake, _ = upstream
    fake.behaviour.token_interval = 0.01
    gateway = start()
    budget = Decimal(1)
    secret, key_id = make_key(gateway.url, budget_usd=str(budget))
    body = {
        "model": "gpt-4o",
        "stream": True,
        "tools": _tools(120),
        "messages": [{"role": "user", "content": "hi"}],
    }
    statuses = []
    for _ in range(40):
        with httpx.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=body,
            headers=auth(secret),
            timeout=30,
        ) as response:
            statuses.append(response.status_code)
            if response.status_code == 200:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        break  # the first text: the client leaves
    assert statuses.count(200) >= 1 and 429 in statuses
    assert fake.biller.total <= budget
    _assert_ledger_matches(fake.biller, gateway.url, key_id)
    left = httpx.get(gateway.url + "/usage", headers=auth(secret)).json()["budget"]
    assert Decimal(str(left["remaining_usd"])) <= budget - fake.biller.total + Decimal("0.00001")


@pytest.mark.parametrize(
    ("model", "calls"), [("gpt-4o", 50), ("o1-mini", 40)], ids=["gpt-4o", "o1-mini"]
)
def test_concurrent_calls_without_max_tokens_reserve_the_model_ceiling(
    start: Any, upstream: tuple[BillingUpstream, str], model: str, calls: int
) -> None:
    """The model writes up to its own ceiling (16,384 / 65,536 tokens): that is reserved."""
    fake, _ = upstream
    fake.behaviour.delay = 0.2
    gateway = start()
    budget = Decimal(1)
    secret, key_id = make_key(gateway.url, budget_usd=str(budget), max_in_flight=calls)
    body = {"model": model, "messages": [{"role": "user", "content": "write a lot"}]}
    statuses = _many(gateway.url, secret, body, calls)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert fake.biller.total <= budget
    assert _recorded(gateway.url, key_id) == pytest.approx(
        fake.biller.total, abs=Decimal("0.00001")
    )


def test_two_replicas_on_redis_hold_one_budget(
    shared_redis: RedisPlace, start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    """100 calls at once with a 100 KB tools prompt, spread over two replicas."""
    fake, _ = upstream
    fake.behaviour.delay = 0.2
    shared = {
        "redis_url": shared_redis.url,
        "redis_prefix": shared_redis.prefix,
        # A row whose settlement could not reach Redis (a loaded machine) is written by the
        # lease reaper: short leases, so that is seconds, not half a minute.
        "lease_seconds": 2.0,
        "reaper_interval": 0.3,
    }
    first, second = start(**shared), start(**shared)
    budget = Decimal(1)
    secret, key_id = make_key(first.url, budget_usd=str(budget), max_in_flight=100)
    body = {
        "model": "gpt-4o",
        "max_tokens": 100,
        "tools": _tools(100),
        "messages": [{"role": "user", "content": "hi"}],
    }
    with ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(
            pool.map(lambda i: _post((first, second)[i % 2].url, secret, body), range(100))
        )
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert fake.biller.total <= budget
    # Each replica writes its rows a moment after its calls end.
    deadline = time.monotonic() + 20
    while _recorded(first.url, key_id) < fake.biller.total * Decimal("0.9"):
        assert time.monotonic() < deadline, (_recorded(first.url, key_id), fake.biller.total)
        time.sleep(0.2)
    _assert_ledger_matches(fake.biller, first.url, key_id)


def _image() -> dict[str, Any]:
    url = "data:image/png;base64," + "iVBORw0KGgo" * 100
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def _pdf(pages: int, between: bytes) -> str:
    """A PDF whose page objects write `between` (PDF whitespace) between /Type and /Page."""
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        *[b"<< /Type" + between + b"/Page /Parent 2 0 R >>" for _ in range(pages)],
    ]
    raw = b"%PDF-1.4\n" + b"".join(
        b"%d 0 obj\n%s\nendobj\n" % (i + 1, o) for i, o in enumerate(objects)
    )
    return "data:application/pdf;base64," + base64.b64encode(raw + b"%%EOF\n").decode()


def _assert_within_budget_and_recorded(
    fake: BillingUpstream, url: str, key_id: str, budget: Decimal, statuses: list[int]
) -> None:
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert fake.biller.total <= budget, fake.biller.total
    _wait_for_rows(url, key_id, statuses.count(200))
    assert _recorded(url, key_id) >= fake.biller.total - Decimal("0.000001")


def test_high_detail_images_to_gpt_4o_mini_are_reserved_at_what_openai_bills(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    """gpt-4o-mini bills an image at up to 48,169 tokens, on top of its context window.

    Before: 1,600 tokens an image, inside the 128,000-token cap: 10 calls of 100 KB and
    two images each reserved $0.0155 apiece, and six of them were billed $0.18 on a
    $0.10 budget (80 images a call: $2.89).
    """
    fake, _ = upstream
    fake.behaviour.delay = 0.2
    gateway = start()
    budget = Decimal("0.10")
    secret, key_id = make_key(gateway.url, budget_usd=str(budget), max_in_flight=10)
    content = [{"type": "text", "text": "x" * 100_000}, _image(), _image()]
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": content}],
    }
    statuses = _many(gateway.url, secret, body, 10)
    assert all(bill.prompt_tokens > 196_000 for bill in fake.biller.bills)
    _assert_within_budget_and_recorded(fake, gateway.url, key_id, budget, statuses)


def test_a_pdf_with_a_newline_between_type_and_page_is_reserved_its_page_images(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    """Before: `/Type\\n/Page` counted no page; 8 calls were billed $0.30 on $0.10."""
    fake, _ = upstream
    fake.behaviour.delay = 0.2
    gateway = start()
    budget = Decimal("0.10")
    secret, key_id = make_key(gateway.url, budget_usd=str(budget), max_in_flight=8)
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": _pdf(10, b"\n")}}
    body = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "sum up"}, part]}],
    }
    statuses = _many(gateway.url, secret, body, 8)
    assert all(bill.prompt_tokens > 10 * 1_445 for bill in fake.biller.bills)
    _assert_within_budget_and_recorded(fake, gateway.url, key_id, budget, statuses)


def test_a_call_that_cannot_fit_is_refused_before_it_starts_with_what_would_fit(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    gateway = start()
    secret, _ = make_key(gateway.url, budget_usd="0.01")
    body = {
        "model": "gpt-4",
        "n": 8,
        "max_tokens": 65536,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=auth(secret), timeout=10
    )
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "$0.010000 left" in error["message"] and "max_tokens" in error["message"]
    assert "used up" not in error["message"]
    assert "retry-after" not in response.headers  # a total budget: waiting does not help
    assert fake.calls == 0
    # What the sentence says would fit does fit.
    fits = int(error["message"].split("Set max_tokens to ")[1].split(" ")[0])
    body |= {"n": 8, "max_tokens": fits}
    assert _post(gateway.url, secret, body) == 200


def test_tokens_per_minute_count_the_worst_case(
    start: Any, upstream: tuple[BillingUpstream, str], moved_clock: Clock
) -> None:
    """50 parallel calls on a 10,000-token-a-minute key: at most one call past the limit."""
    fake, _ = upstream
    fake.behaviour.delay = 0.3
    gateway = start()
    tpm = 10_000
    secret, _ = make_key(gateway.url, tpm=tpm, max_in_flight=50)
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 2000,
        "messages": [{"role": "user", "content": "x"}],
    }
    moved_clock.to_minute_start()  # all 50 in one minute window
    statuses = _many(gateway.url, secret, body, 50)
    billed = sum(bill.prompt_tokens + bill.completion_tokens for bill in fake.biller.bills)
    one_call = max(bill.prompt_tokens + 2000 for bill in fake.biller.bills)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert billed <= tpm + one_call


def _at_once(
    fake: BillingUpstream, url: str, key: str, body: dict[str, Any], count: int
) -> list[httpx.Response]:
    """`count` calls at once: the admitted ones are held at the upstream until every call is
    either refused or held there, so a slow machine cannot finish one before the next arrives."""
    fake.behaviour.hold = threading.Event()
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [
                pool.submit(
                    httpx.post,
                    url + "/v1/chat/completions",
                    json=body,
                    headers=auth(key),
                    timeout=30,
                )
                for _ in range(count)
            ]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if sum(future.done() for future in futures) + fake.held == count:
                    break
                time.sleep(0.01)
            fake.behaviour.hold.set()
            return [future.result() for future in futures]
    finally:
        fake.behaviour.hold = None


def test_calls_in_flight_are_capped_per_key(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    gateway = start(max_in_flight=8)
    capped, _ = make_key(gateway.url, max_in_flight=3)
    default, _ = make_key(gateway.url)
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    answers = _at_once(fake, gateway.url, capped, body, 10)
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 3 and statuses.count(429) == 7
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["error"]["code"] == "too_many_calls_in_flight"
    assert int(refused.headers["retry-after"]) >= 1
    statuses = [answer.status_code for answer in _at_once(fake, gateway.url, default, body, 12)]
    assert statuses.count(200) == 8  # the server's default
    assert _post(gateway.url, capped, body) == 200  # the slots came back
    limits = httpx.get(gateway.url + "/usage", headers=auth(capped)).json()["limits"]
    assert limits["max_in_flight"] == 3


def test_a_whole_answer_the_client_abandons_is_recorded_at_what_was_billed(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    fake.behaviour.delay = 1.0
    gateway = start()
    secret, key_id = make_key(gateway.url, budget_usd="5")
    body = {"model": "gpt-4o", "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]}
    for path, payload in (
        ("/v1/chat/completions", body),
        ("/chat", {"message": "x", "model": "gpt-4o", "max_tokens": 500}),
    ):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.url + path, json=payload, headers=auth(secret), timeout=0.3)
    _wait_for_rows(gateway.url, key_id, 2)
    totals = _ledger(gateway.url, key_id)
    billed = fake.biller.bills
    assert totals["completion_tokens"] == sum(bill.completion_tokens for bill in billed) == 1000
    assert _recorded(gateway.url, key_id) == pytest.approx(
        fake.biller.total, abs=Decimal("0.000001")
    )


@pytest.mark.parametrize("client", ["aiohttp", "sdk"])
def test_a_whole_answer_that_times_out_is_sent_once_and_billed_at_its_worst_case(
    start: Any, upstream: tuple[BillingUpstream, str], client: str
) -> None:
    """OpenAI writes (and bills) a whole answer after the gateway stopped waiting for it.

    Before: the timeout was retried (three calls billed in full for one 504) and the
    one row billed the prompt and 16 tokens: a key could spend 30x what the ledger saw.
    """
    fake, _ = upstream
    fake.behaviour.delay = 1.5  # longer than the gateway waits
    gateway = start(upstream_timeout=0.5, upstream_retries=2, upstream_client=client)
    secret, key_id = make_key(gateway.url, budget_usd="5")
    body = {"model": "gpt-4o", "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]}
    answer = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=auth(secret), timeout=30
    )
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert answer.headers["x-should-retry"] == "false"  # nor an SDK's own retries
    _wait_for_rows(gateway.url, key_id, 1)
    deadline = time.monotonic() + 5
    while not (fake.biller.bills and fake.biller.bills[0].completion_tokens):
        assert time.monotonic() < deadline, "the fake never finished the answer"
        time.sleep(0.05)
    assert fake.calls == 1  # sent once: a retry would be billed again, with no row
    totals = _ledger(gateway.url, key_id)
    assert totals["requests"] == 1
    assert totals["completion_tokens"] == 500 == fake.biller.bills[0].completion_tokens
    assert _recorded(gateway.url, key_id) >= fake.biller.total  # errs on the operator's side


def test_a_stream_the_client_leaves_is_billed_for_prompt_and_output(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    fake.behaviour.token_interval = 0.02
    gateway = start()
    secret, key_id = make_key(gateway.url, budget_usd="5")
    messages = [{"role": "user", "content": "ü" * 5000}]  # two bytes a character: a hostile prompt
    for path, payload in (
        ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": messages}),
        ("/chat/stream", {"model": "gpt-4o", "message": "ü" * 5000}),
    ):
        with httpx.stream(
            "POST", gateway.url + path, json=payload, headers=auth(secret), timeout=30
        ) as response:
            for number, _ in enumerate(response.iter_lines()):
                if number > 20:
                    break
    _wait_for_rows(gateway.url, key_id, 2)
    _assert_ledger_matches(fake.biller, gateway.url, key_id)
    assert fake.closed_early == 2


def test_a_client_that_leaves_before_the_headers_closes_the_upstream_and_leaves_a_row(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    fake.behaviour.delay = 3.0
    gateway = start()
    secret, key_id = make_key(gateway.url, budget_usd="5")
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    payload = json.dumps(body).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(head.encode() + payload)
        # Left once the call reached OpenAI, which holds the headers 3 s: a fixed client
        # timeout left before admission on a loaded machine (no call, so no row to find).
        deadline = time.monotonic() + 10
        while fake.calls < 1:
            assert time.monotonic() < deadline, "the call never reached the upstream"
            time.sleep(0.01)
    _wait_for_rows(gateway.url, key_id, 1)
    _assert_ledger_matches(fake.biller, gateway.url, key_id)
    assert fake.closed_early == 1 or fake.biller.bills[0].completion_tokens == 0


def test_priority_tier_is_refused_for_budgeted_keys(
    start: Any, upstream: tuple[BillingUpstream, str]
) -> None:
    fake, _ = upstream
    gateway = start()
    budgeted, _ = make_key(gateway.url, budget_usd="5")
    free, _ = make_key(gateway.url)
    body = {
        "model": "gpt-4o-mini",
        "service_tier": "priority",
        "messages": [{"role": "user", "content": "x"}],
    }
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=auth(budgeted), timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "service_tier"
    assert fake.calls == 0
    assert _post(gateway.url, free, body | {"max_tokens": 5}) == 200


def _wait_for_rows(url: str, key_id: str, count: int) -> None:
    """Rows are written a moment after the call ends (and after a whole answer is read)."""
    deadline = time.monotonic() + 10
    while _ledger(url, key_id)["requests"] < count:
        assert time.monotonic() < deadline, json.dumps(_ledger(url, key_id))
        time.sleep(0.1)
