"""Errors as OpenAI says them, and retries that do not multiply.

The real `openai` SDK (default `max_retries=2`) calls the gateway, which has
its own two retries; the fake upstream counts every call it gets. Each case
runs through both upstream clients (aiohttp, the default, and the SDK).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, GatewayPool
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.servers import ServerThread

FAST_RETRY = {"retry-after-ms": "5"}  # the gateway's own retries, without the wait
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["aiohttp", "sdk"])
def upstream_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def retrying(
    shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI, upstream_client: str
) -> str:
    """A gateway that retries twice, as by default (shared: the cases only read); its URL."""
    return shared_gateways.get(upstream_retries=2, upstream_client=upstream_client).url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="anything")  # the SDK's default retries


def _error(message: str, *, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def call_sdk(url: str, *, stream: bool = False) -> tuple[openai.APIStatusError, float]:
    started = time.monotonic()
    with sdk(url) as client, pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=stream)  # type: ignore[call-overload]
    return raised.value, time.monotonic() - started


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("status", [500, 503, 429])
def test_an_upstream_failing_every_try_costs_three_calls_not_nine(
    retrying: str, fake: FakeOpenAI, status: int, stream: bool, upstream_client: str
) -> None:
    fake.queue(*[Plan(status=status, headers=FAST_RETRY) for _ in range(9)])
    error, took = call_sdk(retrying, stream=stream)
    print(f"{upstream_client} {status} stream={stream}: {fake.hits} calls, {took:.2f} s")
    assert fake.hits == 3  # the gateway's call and its two retries; the SDK does not add six
    assert error.status_code == (429 if status == 429 else 502)
    assert error.response.headers["x-should-retry"] == "false"
    if status == 429:
        assert error.response.headers["retry-after"] == "1"  # the upstream's 5 ms, rounded up
        assert error.body["type"] == "requests" and error.body["code"] == "rate_limit_exceeded"  # type: ignore[index]


def test_without_gateway_retries_the_sdk_may_retry(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    url = gateway_factory(upstream_retries=0).url
    fake.queue(*[Plan(status=500) for _ in range(3)])
    response = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 502
    assert "x-should-retry" not in response.headers  # nobody retried yet: the SDK's call
    assert fake.hits == 1


QUOTA = _error(
    "You exceeded your current quota, please check your plan and billing details.",
    kind="insufficient_quota",
    code="insufficient_quota",
)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_operators_account_out_of_credit_is_insufficient_quota_at_once(
    retrying: str, fake: FakeOpenAI, stream: bool, upstream_client: str
) -> None:
    fake.queue(*[Plan(status=429, error_body=QUOTA) for _ in range(9)])
    error, took = call_sdk(retrying, stream=stream)
    print(f"{upstream_client} insufficient_quota stream={stream}: {fake.hits} call, {took:.2f} s")
    assert fake.hits == 1  # no retry by the gateway, none by the SDK
    assert isinstance(error, openai.RateLimitError)
    assert error.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert error.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert "run out of credit" in error.message
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-should-retry"] == "false"


def test_the_simple_api_says_so_too(retrying: str, fake: FakeOpenAI) -> None:
    fake.queue(Plan(status=429, error_body=QUOTA), Plan(status=429, error_body=QUOTA))
    for path in ("/chat", "/chat/stream"):
        response = httpx.post(retrying + path, json={"message": "hi"}, timeout=10)
        assert response.status_code == 429
        assert "run out of credit" in response.json()["error"]
    assert fake.hits == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_model_not_found_stays_404_model_not_found(
    retrying: str, fake: FakeOpenAI, stream: bool
) -> None:
    body = _error(
        "The model `gpt-4o-mini` does not exist or you do not have access to it.",
        kind="invalid_request_error",
        code="model_not_found",
    )
    fake.queue(Plan(status=404, error_body=body))
    error, _ = call_sdk(retrying, stream=stream)
    assert isinstance(error, openai.NotFoundError)
    assert error.body["code"] == "model_not_found"  # type: ignore[index]
    assert error.body["param"] == "model"  # type: ignore[index]
    assert fake.hits == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_project_that_may_not_use_the_model_is_403(
    retrying: str, fake: FakeOpenAI, stream: bool
) -> None:
    body = _error(
        "Project `proj_abc123` does not have access to model `gpt-4o-mini`",
        kind="invalid_request_error",
        code="model_not_found",
    )
    fake.queue(Plan(status=403, error_body=body))
    error, _ = call_sdk(retrying, stream=stream)
    assert isinstance(error, openai.PermissionDeniedError)
    assert error.body["type"] == "permission_denied"  # type: ignore[index]
    assert "does not allow this server's account to use this model" in error.message
    assert "proj_abc123" not in error.message
    fake.queue(Plan(status=403, error_body=body))
    simple = httpx.post(retrying + "/chat", json={"message": "hi"}, timeout=10)
    assert simple.status_code == 403
    assert "does not allow this server's account" in simple.json()["error"]
    assert fake.hits == 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_rejected_operator_key_is_502_and_not_retried(
    retrying: str, fake: FakeOpenAI, stream: bool
) -> None:
    fake.queue(*[Plan(status=401) for _ in range(9)])
    error, _ = call_sdk(retrying, stream=stream)
    assert error.status_code == 502
    assert error.body["code"] == "upstream_auth"  # type: ignore[index]
    assert error.response.headers["x-should-retry"] == "false"
    assert fake.hits == 1


def test_every_gateway_400_has_a_code(gateway_factory: GatewayFactory, fake: FakeOpenAI) -> None:
    url = gateway_factory().url + "/v1/chat/completions"
    cases = {
        b"{broken": "invalid_json",
        b"": "invalid_json",
        b"[1, 2]": "invalid_type",
        b'{"messages": []}': "invalid_value",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}': "invalid_value",
        b'{"messages": [{"role": "user", "content": "hi"}], "api_key": "x"}': "invalid_value",
    }
    for body, code in cases.items():
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == code, body
        assert response.json()["error"]["type"] == "invalid_request_error"
    fake.queue(Plan(status=400, error_body=_error("Bad.", kind="invalid_request_error", code=None)))
    upstream = httpx.post(url, json={"messages": MESSAGES})
    assert upstream.status_code == 400 and upstream.json()["error"]["code"] == "invalid_value"
    assert fake.hits == 1
