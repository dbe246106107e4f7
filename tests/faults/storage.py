"""Storage a test may break: a PostgreSQL server of its own, and a TCP proxy that can hang.

`ThrowawayPostgres` runs `initdb` and `pg_ctl` into a temporary folder on a
free port, with the settings the test asks for (`max_connections=60`), and
removes it all afterwards; the machine's shared server is never touched.
As root the server runs as the `postgres` user (PostgreSQL refuses root).

`TcpProxy` forwards 127.0.0.1:<port> to a target; `hang()` stops passing
bytes either way (connections stay open, as with a stalled server or a
network that drops everything), `resume()` passes them again; `forget()`
drops every connection open now without telling the client, which learns it
(a reset) only when it next sends, as from a NAT that timed the flow out.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgres_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class ThrowawayPostgres:
    def __init__(self, **settings: str) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
        self._bin = binaries
        self.port = _free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="chat-api-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self._dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        options = {
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
            "unix_socket_directories": str(self._dir),
            **settings,
        }
        self._options = " ".join(f"-c {name}={value}" for name, value in options.items())
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self._dir / "log"), "-w", "-t", "30",
                  "-o", f"-p {self.port} {self._options}", "start")  # fmt: skip

    @property
    def data(self) -> Path:
        return self._dir / "data"

    def url(self, port: int | None = None) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port or self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self._bin / tool), *args], check=True, capture_output=True)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._dir, ignore_errors=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a reset (RST), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Flow:
    """One connection through the proxy: its two sides, and whether it was forgotten."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream
        self.forgotten = False
        self.lose_answer = False


class TcpProxy:
    """A loopback TCP forwarder on its own event loop thread; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._flows: set[_Flow] = set()
        self._lose_answer = b""  # in a request: its answer is lost
        self._refuse = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse > 0:  # answered with a reset, as a port nothing listens on
            self._refuse -= 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        flow = _Flow(writer, up_writer)
        self._flows.add(flow)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, flow, from_client=True),
                self._pipe(up_reader, writer, flow, from_client=False),
                return_exceptions=True,
            )
        finally:
            self._flows.discard(flow)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flow: _Flow,
        *,
        from_client: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if from_client and self._lose_answer and self._lose_answer in data:
                    self._lose_answer, flow.lose_answer = b"", True
                if not from_client and flow.lose_answer:  # dropped; the client is reset
                    flow.forgotten = True
                    flow.upstream.close()
                    _reset(flow.client)
                    return
                if flow.forgotten:
                    if from_client:  # what a forgotten flow's client sends is answered RST
                        _reset(flow.client)
                    return
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            if not flow.forgotten:
                writer.close()
            elif from_client:  # the client is done with a forgotten flow (left, or reset)
                flow.client.close()

    def lose_the_next_answer(self, to: bytes, *, then_refuse: int = 0) -> None:
        """The answer to the next request containing `to` is dropped and its client reset:
        what it asked ran, but it never hears so. Then `then_refuse` new connections are reset."""

        def arm() -> None:
            self._lose_answer, self._refuse = to, then_refuse

        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (arm(), done.set()))
        done.wait(5)

    def forget(self) -> None:
        """Forget every connection open now, as a NAT or load balancer that timed them out.

        The target's side is closed; the client is told nothing until it next sends,
        which is answered with a reset: a pooled connection gone stale without a FIN.
        """

        def forget_all() -> None:
            for flow in list(self._flows):
                flow.forgotten = True
                flow.upstream.close()

        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (forget_all(), done.set()))
        done.wait(5)

    def hang(self) -> None:
        self.loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self.loop.call_soon_threadsafe(self._flowing.set)

    def stop(self) -> None:
        self.resume()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")
