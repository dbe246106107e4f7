"""Shared fixtures: a clean environment, the fake OpenAI server, and a gateway in front of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

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
    upstream.arrived.clear()
    upstream.biller.clear()
    yield upstream
    upstream.plans.clear()


@pytest.fixture
def upstream_url(fake_server: tuple[FakeOpenAI, ServerThread]) -> str:
    return fake_server[1].url + "/v1"


GatewayFactory = Callable[..., ServerThread]


class Stoppable(Protocol):
    def stop(self) -> None: ...


Started = TypeVar("Started", bound=Stoppable)


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


class GatewayPool(Generic[Started]):
    """Gateways a module's tests share: one for each set of settings asked for.

    Starting a gateway costs more than most cases that use one. Tests that only
    read (a call and its answer, nothing that counts rows, keys or failures
    across tests, nothing that stops the server) can share one; `start` makes
    what the pool hands out (a plain server, or one that records its answers).
    """

    def __init__(
        self,
        fake: FakeOpenAI,
        upstream_url: str,
        folder: Path,
        start: Callable[[Settings], Started],
    ) -> None:
        self.fake = fake
        self.upstream_url = upstream_url
        self.folder = folder
        self.start = start
        self.started: dict[str, Started] = {}

    def get(self, **overrides: Any) -> Started:
        """The running gateway with these settings (on top of the test defaults), started once."""
        key = repr(sorted(overrides.items()))
        if key not in self.started:
            folder = self.folder / f"gateway-{len(self.started)}"
            folder.mkdir()
            # Rows are written at once, so a case finds its call's row without waiting.
            values = {"ledger_flush_interval": 0.05, **overrides}
            settings = gateway_settings(self.fake, self.upstream_url, folder, **values)
            self.started[key] = self.start(settings)
        return self.started[key]

    def stop(self) -> None:
        for gateway in self.started.values():
            gateway.stop()


@pytest.fixture(scope="module")
def shared_gateways(
    fake_server: tuple[FakeOpenAI, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayPool[ServerThread]]:
    """The module's shared gateways (see GatewayPool): `shared_gateways.get(**settings)`."""
    fake, server = fake_server
    pool = GatewayPool(
        fake,
        server.url + "/v1",
        tmp_path_factory.mktemp("shared"),
        lambda settings: ServerThread(create_app(settings)).start(),
    )
    yield pool
    pool.stop()


@pytest.fixture
def shared_gateway(shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI) -> ServerThread:
    """The module's gateway with the default test settings, for tests that only read."""
    return shared_gateways.get()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        yield http
