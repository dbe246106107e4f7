"""Client faults: clients that crawl, and a crowd of clients at once.

A client that leaves is an upstream matter (its call must stop): tests/faults/test_upstream.py.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chat_api import serving
from chat_api.serving import GuardedHttpToolsProtocol
from tests.clock import avoid_minute_edge
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.faults.conftest import (
    FULL,
    GatewayMaker,
    ProcStats,
    proc_stats,
    size,
)
from tests.keys.conftest import MASTER, auth, make_key
from tests.ops.conftest import Spawn
from tests.servers import ServerThread

pytestmark = pytest.mark.faults

# --- slow clients -------------------------------------------------------------------------


def _closed_while_dripping(sockets: list[socket.socket], limit: float, drip: bytes) -> int:
    """Drip `drip` into each socket every 0.2 s until the server closes it: how many it closed."""
    started = time.monotonic()
    closed: set[socket.socket] = set()
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    try:
        while len(closed) < len(sockets) and time.monotonic() - started < limit:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    closed.add(sock)
                    selector.unregister(sock)
            for sock in sockets:
                if sock not in closed:
                    try:
                        sock.send(drip)
                    except OSError:
                        closed.add(sock)
                        selector.unregister(sock)
    finally:
        selector.close()
    return len(closed)


def _open(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the server has neither answered nor closed."""
    count = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            count += 1  # nothing to read yet: still waiting on us
        except OSError:
            pass
        finally:
            sock.setblocking(True)
    return count


def _served(url: str) -> None:
    response = httpx.post(url + "/chat", json={"message": "am I still served?"}, timeout=5)
    assert response.status_code == 200


def test_slow_headers_are_cut_at_the_header_deadline_and_others_are_served(
    gw: GatewayMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    deadline = serving.HEADER_TIMEOUT if FULL else 2.0
    monkeypatch.setattr(serving, "HEADER_TIMEOUT", deadline)
    server = gw(server_config={"http": GuardedHttpToolsProtocol})
    crawlers = [socket.create_connection(("127.0.0.1", server.server.port)) for _ in range(50)]
    for sock in crawlers:
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        _served(server.url)  # answered while 50 clients crawl,
        assert _open(crawlers) == 50  # before the deadline cut any of them
        # A byte now and then does not keep a connection that never finishes its headers.
        closed = _closed_while_dripping(crawlers, deadline + 5, drip=b"X")
    finally:
        for sock in crawlers:
            sock.close()
    assert closed == 50, "some slow-header connections were never closed"
    _served(server.url)


def test_slow_body_gets_408_at_the_body_deadline_and_others_are_served(gw: GatewayMaker) -> None:
    server = gw(body_timeout=2.0)
    crawlers = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.server.port))
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        crawlers.append(sock)
    try:
        _served(server.url)  # answered while 20 bodies crawl,
        assert _open(crawlers) == 20  # before the deadline answered any of them
        replies: list[bytes] = []
        for sock in crawlers:
            sock.settimeout(5)
            reply = b""
            while True:  # read until the server closes: 408, then the connection ends
                try:
                    piece = sock.recv(65536)
                except OSError:
                    break
                if not piece:
                    break
                reply += piece
            replies.append(reply)
    finally:
        for sock in crawlers:
            sock.close()
    assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies), replies[0][:200]
    assert b"did not arrive within 2 seconds" in replies[0]
    _served(server.url)


# --- a crowd of concurrent streams ------------------------------------------------------------


IDLE_CLOSE = 1  # seconds before the crowd's fake closes an idle keep-alive connection


@pytest.fixture
def quick_closing_fake() -> Iterator[tuple[FakeOpenAI, str]]:
    """A fake upstream of this test's own that closes idle connections after 1 s, not 5."""
    fake = FakeOpenAI()
    with ServerThread(fake, timeout_keep_alive=IDLE_CLOSE) as server:
        yield fake, server.url + "/v1"


def idle_stats(url: str, pid: int) -> ProcStats:
    """Open files and memory once idle: upstream connections the fake closed are let go.

    The fake closes idle keep-alive connections after `IDLE_CLOSE`; the
    gateway's pool drops dead ones the next time it is used, so wait, call
    once, then measure.
    """
    time.sleep(IDLE_CLOSE + 0.5)
    httpx.post(url + "/chat", json={"message": "hi"}, headers=auth(MASTER), timeout=10)
    time.sleep(0.5)
    return proc_stats(pid)


async def _one_stream(port: int, key: str, body: bytes) -> int:
    """A bare HTTP/1.1 stream read to its end; the status (0 when the connection failed)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=60
        )
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(
            b"POST /chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout=120)
    except (OSError, TimeoutError):
        return 0
    finally:
        writer.close()
    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
    if status == 200 and b'"done": true' not in data.replace(b'"done":true', b'"done": true'):
        return -1  # a stream that did not end with its done event
    return status


async def _crowd(port: int, key: str, count: int) -> Counter[int]:
    body = json.dumps({"message": "hello"}).encode()
    results = await asyncio.gather(*(_one_stream(port, key, body) for _ in range(count)))
    return Counter(results)


@pytest.mark.slow
def test_a_crowd_of_concurrent_streams_is_served_or_capped_and_resources_come_back(
    spawn: Spawn, quick_closing_fake: tuple[FakeOpenAI, str], tmp_path: Path
) -> None:
    fake, upstream_url = quick_closing_fake
    count = size(5000, 300)
    cap = count * 4 // 5  # the key may make this many requests a minute; the rest get 429
    gateway = spawn(
        {
            "OPENAI_API_KEY": fake.api_key,
            "OPENAI_BASE_URL": upstream_url,
            # One retry, as in production (2 by default): the fake closes idle connections
            # after 1 s, and a stream that reuses one at that instant is sent again, not 502.
            "CHAT_API_UPSTREAM_RETRIES": "1",
            "CHAT_API_MASTER_KEY": MASTER,
            "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "CHAT_API_LOG_LEVEL": "warning",
        }
    )
    pid = gateway.process.pid
    warm, _ = make_key(gateway.url, max_in_flight=1000)
    fake.queue(*[Plan(chunk_interval=0.05) for _ in range(2 * count + 100)])
    # Warm up with concurrent key lookups: the database pool grows to its steady size.
    asyncio.run(_crowd(gateway.port, warm, 100))
    baseline = idle_stats(gateway.url, pid)
    after: list[ProcStats] = []
    for round_ in range(2):  # the second round shows whether anything ratchets up
        # A fresh key (a fresh per-minute count) allowed as many streams at once as it may make.
        secret, _ = make_key(gateway.url, rpm=cap, max_in_flight=count)
        avoid_minute_edge(margin=45 if FULL else 5)  # a CI round takes a second or two
        started = time.monotonic()
        results = asyncio.run(_crowd(gateway.port, secret, count))
        took = time.monotonic() - started
        peak = proc_stats(pid)
        after.append(idle_stats(gateway.url, pid))
        print(
            f"round {round_ + 1}: {count} streams in {took:.1f} s: {dict(results)}; "
            f"fds {baseline.fds} -> {after[-1].fds}; rss {baseline.rss_kb // 1024} -> "
            f"peak {peak.peak_kb // 1024} -> {after[-1].rss_kb // 1024} MiB"
        )
        problems = [line for line in gateway.logs().splitlines() if '"level":"error"' in line]
        assert results == Counter({200: cap, 429: count - cap}), (results, problems[:3])
        open_files = sorted(str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir())
        assert after[-1].fds <= baseline.fds + 10, f"open files: {baseline.fds}, {open_files}"
    # Memory: the first crowd raises the allocator's high-water mark (CPython keeps freed
    # arenas); a second, equal crowd must not add to it, or something is held per stream.
    first_growth = after[0].rss_kb - baseline.rss_kb
    ratchet = after[1].rss_kb - after[0].rss_kb
    assert ratchet < max(16 * 1024, first_growth // 4), (
        f"memory ratcheted: +{first_growth // 1024} MiB, then +{ratchet // 1024} MiB"
    )
    # and the gateway still answers
    assert httpx.post(
        gateway.url + "/chat", json={"message": "hi"}, headers=auth(MASTER)
    ).is_success
    assert fake.api_key not in gateway.logs() and MASTER not in gateway.logs()
