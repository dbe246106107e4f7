"""Gateways as real processes (`python -m chat_api serve`), for signals and scale-out."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.keys.conftest import postgres_url, private_redis, shared_redis

__all__ = ["postgres_url", "private_redis", "shared_redis"]  # fixtures shared with tests/keys


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GatewayProcess:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))}
        full |= env | {"CHAT_API_PORT": str(self.port), "CHAT_API_LOG_FORMAT": "json"}
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chat_api", "serve", *args],
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers are stopped with it
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start:\n" + log.read_text())
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # any worker left behind
        self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text()


Spawn = Callable[..., GatewayProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    started: list[GatewayProcess] = []
    numbers = itertools.count()  # each its own log, even when started side by side

    def start(env: dict[str, str], *args: str) -> GatewayProcess:
        gateway = GatewayProcess(env, tmp_path / f"gateway-{next(numbers)}.log", *args)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:  # all told at once: each takes a moment to stop
        if gateway.process.poll() is None:
            gateway.signal(signal.SIGTERM)
    for gateway in started:
        gateway.stop()
