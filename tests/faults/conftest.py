"""Fixtures for the fault suite: sizes for CI or full runs, a recording gateway, secret checks.

Every gateway started here is wrapped in `Recorder`, which keeps every byte
the gateway sent back (headers and bodies, streams included). After each
test, `no_secret_leaks` checks those bytes and every captured log record for
the operator's OpenAI key, the master key and any full client key.

Sizes: `CI=true` scales the big cases down; `CHAT_API_FAULTS_FULL=1`
(`make faults`) runs them at the sizes the README reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_api.app import create_app
from chat_api.config import Settings
from tests.conftest import GatewayPool, gateway_settings
from tests.fakes.openai_server import FakeOpenAI
from tests.keys.conftest import (
    MASTER,
    postgres_url,
    private_redis,
    shared_redis,
)
from tests.ops.conftest import spawn
from tests.servers import ServerThread

__all__ = ["postgres_url", "private_redis", "shared_redis", "spawn"]

FULL = os.environ.get("CHAT_API_FAULTS_FULL") == "1"
CI = os.environ.get("CI", "").lower() == "true" and not FULL

CLIENT_KEY = re.compile(rb"cak_[A-Za-z0-9_\-]{20,}")


def size(full: int, ci: int, default: int | None = None) -> int:
    """A case's size: `full` under CHAT_API_FAULTS_FULL=1, `ci` under CI=true, else `default`."""
    if FULL:
        return full
    if CI:
        return ci
    return default if default is not None else ci


def seconds(full: float, ci: float) -> float:
    return full if FULL else ci


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `check` until it holds or `timeout` seconds pass; bounded, never a busy loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Exchange:
    method: str
    path: str
    status: int = 0
    data: bytearray = field(default_factory=bytearray)


class Recorder:
    """Plain ASGI wrapper that keeps everything the gateway answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope["method"], scope["path"])
        self.exchanges.append(exchange)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                for name, value in message.get("headers", ()):
                    exchange.data += name + b": " + value + b"\n"
            elif message["type"] == "http.response.body":
                exchange.data += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class Gateway:
    """One gateway in a thread: its server, its app (for its state) and what it answered."""

    server: ServerThread
    app: Any
    recorder: Recorder
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> Any:
        return self.app.state.runtime

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Secrets:
    """Strings that must never leave the gateway (besides a key's one-time creation answer)."""

    values: set[str] = field(default_factory=set)

    def add(self, value: str) -> None:
        self.values.add(value)

    def leaks_in(self, data: bytes) -> list[str]:
        found = [value for value in self.values if value.encode() in data]
        found += [m.decode() for m in CLIENT_KEY.findall(data)]
        return found


@pytest.fixture
def secrets_watch(fake: FakeOpenAI) -> Secrets:
    return Secrets({fake.api_key, MASTER})


@pytest.fixture
def recorders() -> list[Recorder]:
    return []


@pytest.fixture(autouse=True)
def capture_every_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Capture every logger at DEBUG, so the secret check sees the SDK's and httpx's lines too."""
    caplog.set_level(logging.DEBUG)


def assert_no_secret_leaks(
    watch: Secrets, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """No key in any response the gateways sent, nor in any captured log line."""
    for recorder in recorders:
        for ex in recorder.exchanges:
            if ex.method == "POST" and ex.path == "/admin/keys" and ex.status == 201:
                continue  # the one answer that shows a new key, by design
            leaks = watch.leaks_in(bytes(ex.data))
            assert not leaks, f"{ex.method} {ex.path} answered with a secret: {leaks}"
    lines = "\n".join(
        record.getMessage() + " " + str(record.__dict__) for record in caplog.records
    ).encode()
    leaks = watch.leaks_in(lines)
    assert not leaks, f"a log line carried a secret: {leaks}"


GatewayMaker = Callable[..., Gateway]


@pytest.fixture
def gw(
    fake: FakeOpenAI,
    upstream_url: str,
    tmp_path: Path,
    recorders: list[Recorder],
    secrets_watch: Secrets,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[GatewayMaker]:
    """Start recording gateways (pointed at the fake unless told otherwise)."""
    started: list[Gateway] = []

    def start(*, server_config: dict[str, Any] | None = None, **overrides: Any) -> Gateway:
        settings = gateway_settings(fake, upstream_url, tmp_path, **overrides)
        if settings.openai_api_key is not None:
            secrets_watch.add(settings.openai_api_key.get_secret_value())
        gateway = start_recording(settings, **(server_config or {}))
        recorders.append(gateway.recorder)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
    assert_no_secret_leaks(secrets_watch, recorders, caplog)


def start_recording(settings: Settings, **server_config: Any) -> Gateway:
    app = create_app(settings)
    recorder = Recorder(app)
    server = ServerThread(recorder, **server_config).start()
    return Gateway(server, app, recorder, settings)


@pytest.fixture(scope="module")
def gateway_pool(
    fake_server: tuple[FakeOpenAI, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayPool[Gateway]]:
    """The module's shared gateways, each recording its answers for the secret checks."""
    fake, server = fake_server
    pool = GatewayPool(fake, server.url + "/v1", tmp_path_factory.mktemp("pool"), start_recording)
    yield pool
    pool.stop()


@pytest.fixture
def pooled(
    gateway_pool: GatewayPool[Gateway],
    fake: FakeOpenAI,
    secrets_watch: Secrets,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[GatewayPool[Gateway]]:
    """The module's shared gateways, with this test's answers and log lines checked for keys."""
    for gateway in gateway_pool.started.values():
        gateway.recorder.exchanges.clear()
    yield gateway_pool
    recorders = []
    for gateway in gateway_pool.started.values():
        recorders.append(gateway.recorder)
        if gateway.settings.openai_api_key is not None:
            secrets_watch.add(gateway.settings.openai_api_key.get_secret_value())
    assert_no_secret_leaks(secrets_watch, recorders, caplog)


@dataclass(frozen=True)
class ProcStats:
    fds: int
    rss_kb: int
    peak_kb: int


def proc_stats(pid: int) -> ProcStats:
    """Open files and memory of a process, read from /proc."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return ProcStats(fds, fields["VmRSS"], fields["VmHWM"])


def ledger_rows(db: Path) -> list[dict[str, Any]]:
    import sqlite3

    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=0.5)) as connection:
        connection.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]
        except sqlite3.OperationalError:
            return []
