"""Start, watch and stop the benchmark's processes: upstream, gateway, load generator.

Everything listens on 127.0.0.1. Where `taskset` exists the gateway is
pinned to core 0 and the upstream and load generator to the other cores, so
the gateway's numbers are those of one worker on one core.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
FAKE_KEY = "sk-bench-fake-upstream-key"


def cores() -> tuple[str, str]:
    """(the gateway's cores, everyone else's) for taskset; ("", "") when not pinning."""
    count = os.cpu_count() or 1
    if shutil.which("taskset") is None or count < 2:
        return "", ""
    return "0", f"1-{count - 1}" if count > 2 else "1"


def pinned(cpus: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 5,
    key: str | None = None,
) -> Any:
    """A small stdlib HTTP call for control and readiness, never for load."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        payload = orjson.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"} if payload else {}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return orjson.loads(data) if data else None
    finally:
        conn.close()


def _stop(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


class Upstream:
    """The fake OpenAI upstream, in its own process."""

    def __init__(self, cpus: str, workdir: Path) -> None:
        self.log = (workdir / "upstream.log").open("wb")
        self.process = subprocess.Popen(
            pinned(cpus, [sys.executable, "-m", "bench.upstream", "--lifetime", "3600"]),
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.port = int(line.split()[1])

    def configure(self, **behaviour: Any) -> None:
        request(self.port, "POST", "/_bench/config", behaviour)

    def stop(self) -> None:
        _stop(self.process)
        self.log.close()


class RedisServer:
    """A redis-server of the bench's own on loopback (no persistence), beside the upstream."""

    def __init__(self, cpus: str, workdir: Path) -> None:
        self.port = free_port()
        self.log = (workdir / "redis.log").open("wb")
        argv = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", ""]
        self.process = subprocess.Popen(
            pinned(cpus, [*argv, "--appendonly", "no"]),
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def stop(self) -> None:
        _stop(self.process)
        self.log.close()


class Server:
    """A server process under test on core 0: its port, its pid, a way to stop it."""

    def __init__(self, cpus: str, workdir: Path, argv: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = (workdir / "gateway.log").open("ab")
        self.process = subprocess.Popen(
            pinned(cpus, [*argv, "--host", HOST, "--port", str(self.port)]),
            env=env,
            cwd=workdir,  # no stray .env is read
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{argv[2]} exited; see {workdir / 'gateway.log'}")
            try:
                request(self.port, "GET", "/health", timeout=1)
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{argv[2]} did not become ready in 30 s") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _stop(self.process, grace=25)
        self.log.close()


def _clean_env(upstream_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))}
    env.update(OPENAI_API_KEY_CYB_SEC=FAKE_KEY, OPENAI_BASE_URL=f"http://{HOST}:{upstream_port}/v1")
    return env


class Gateway(Server):
    """`chat-api serve` in its own process, pointed at the fake upstream, keys off."""

    def __init__(
        self,
        cpus: str,
        workdir: Path,
        upstream_port: int,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = _clean_env(upstream_port)
        env["CHAT_API_DATABASE_URL"] = f"sqlite+aiosqlite:///{workdir}/bench.db"
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "chat_api", "serve"]
        super().__init__(
            cpus, workdir, [*argv, "--workers", str(workers), "--backlog", "16384"], env
        )


class BareRelay(Server):
    """`bench/floor.py` on uvicorn with the gateway's loop and parser: the stack's own cost."""

    def __init__(self, cpus: str, workdir: Path, upstream_port: int) -> None:
        env = _clean_env(upstream_port)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        argv = [sys.executable, "-m", "uvicorn", "bench.floor:app", "--loop", "uvloop"]
        argv += ["--http", "httptools", "--log-level", "warning", "--backlog", "16384"]
        super().__init__(cpus, workdir, argv, env)


def rss_kib(pid: int) -> int:
    """Resident memory of one process, in KiB."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time one process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RSSSampler:
    """Samples a process's RSS every 10 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_kib(self.pid))
            self._stop.wait(0.01)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def load(cpus: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load generator once, in its own process, and return its result."""
    limit = float(spec.get("duration", 60)) + float(spec.get("timeout", 0)) + 60
    done = subprocess.run(
        pinned(cpus, [sys.executable, "-m", "bench.loadgen", orjson.dumps(spec).decode()]),
        capture_output=True,
        timeout=limit,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result
