"""Shared fixtures: a clean environment, the fake OpenAI server, and a gateway in front of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chat_api.app import create_app
from chat_api.config import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import ServerThread

pytest_plugins = ["tests.clock"]  # the `moved_clock` fixture

# A test that uses one of these fixtures needs that server: it carries the marker.
NEEDS = {
    "postgres_url": "postgres",  # a fresh database on the machine's PostgreSQL
    "database": "postgres",  # a PostgreSQL server of the test's own (tests/faults)
    "shared_redis": "redis",
    "private_redis": "redis",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the servers their fixtures need, so `-m "not postgres"` leaves them out."""
    for item in items:
        for name in sorted(set(getattr(item, "fixturenames", ())) & NEEDS.keys()):
            item.add_marker(NEEDS[name])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's keys or settings, or a stray .env file."""
    for name in list(os.environ):
        if name.startswith(("CHAT_API_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    fake = FakeOpenAI()
    with ServerThread(fake) as server:
        yield fake, server


@pytest.fixture
def fake(fake_server: tuple[FakeOpenAI, ServerThread]) -> Iterator[FakeOpenAI]:
    """The fake upstream, emptied of what earlier tests left."""
    upstream = fake_server[0]
    upstream.plans.clear()
    upstream.received.clear()
    upstream.biller.clear()
    yield upstream
    upstream.plans.clear()


@pytest.fixture
def upstream_url(fake_server: tuple[FakeOpenAI, ServerThread]) -> str:
    return fake_server[1].url + "/v1"


GatewayFactory = Callable[..., ServerThread]


def gateway_settings(
    fake: FakeOpenAI, upstream_url: str, folder: Path, **overrides: Any
) -> Settings:
    """A test gateway's settings: pointed at the fake, no retries, SQLite in `folder`.

    The engine's shutdown grace is the test server's (tests/servers.py: 1 s), as
    `chat-api serve` makes them one number: a stopped gateway does not wait 20 s
    for a whole answer its client gave up on.
    """
    values: dict[str, Any] = {
        "openai_api_key": fake.api_key,
        "openai_base_url": upstream_url,
        "upstream_retries": 0,
        "database_url": f"sqlite+aiosqlite:///{folder}/gateway.db",
        "shutdown_grace": 1.0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def gateway_factory(
    fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> Iterator[GatewayFactory]:
    """Start gateways with the settings a test chooses (pointed at the fake by default)."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        settings = gateway_settings(fake, upstream_url, tmp_path, **overrides)
        server = ServerThread(create_app(settings)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> ServerThread:
    return gateway_factory()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        yield http
