"""Fixtures for keys, limits and the ledger: real PostgreSQL, real Redis, and helpers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

MASTER = "master-key-for-tests-0123456789"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards.

    Ask for it before any gateway fixture: fixtures stop in reverse order, so the
    gateways then stop (and write their last rows) before the database goes.
    """
    if not _answers(5432):
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432 (.ci/run starts it)")
    import asyncpg

    name = "chatapi_" + secrets.token_hex(6)

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_ADMIN)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class RedisPlace:
    url: str
    prefix: str


@pytest.fixture
def shared_redis() -> Iterator[RedisPlace]:
    """The machine's Redis, with a key prefix of this test's own."""
    if not _answers(6379):
        pytest.skip("Redis is not answering on 127.0.0.1:6379 (.ci/run starts it)")
    place = RedisPlace("redis://127.0.0.1:6379/0", f"test:{secrets.token_hex(4)}:")
    yield place
    import redis

    client = redis.Redis.from_url(place.url)
    for key in client.scan_iter(match=place.prefix + "*"):
        client.delete(key)
    client.close()


class PrivateRedis:
    """A redis-server of this test's own, which the test may stop and start again."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)

    @contextlib.contextmanager
    def hung(self) -> Iterator[None]:
        """Redis stops answering without closing anything (SIGSTOP), as a hung host does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(base_url: str, **spec: Any) -> tuple[str, str]:
    """Create a client key through the admin API; returns (secret, id)."""
    spec.setdefault("name", "test key")
    response = httpx.post(base_url + "/admin/keys", json=spec, headers=auth(MASTER))
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["id"]
