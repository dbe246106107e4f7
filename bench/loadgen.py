"""The load generator: raw keep-alive HTTP/1.1 on asyncio protocols, httptools, uvloop.

One process runs one load spec (a JSON object on the command line) and
prints one JSON result on stdout. Every mode is bounded twice: by a request
count and by a wall-clock deadline; whatever has not finished by then is
counted as failed.

Modes:

- `closed`: `concurrency` connections, each sending its next request as soon
  as the previous answer is complete, until `requests` answers (after
  `warmup` unrecorded ones) or `duration` seconds.
- `streams`: `streams` streamed requests at once, one connection each
  (connects paced by `connect_parallel`); records time to the first event
  that holds `first_marker` (default `data:`, any event; Responses streams
  pass `event: response.output_text.delta`, the first text), time to the
  end, and the events received (`event:`/`data:` blocks ending in a blank line).
- `open`: `rate` requests per second for `duration` seconds whatever the
  server does (open loop); latency is counted from each request's planned
  start, so a server that falls behind is charged for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import httptools
import orjson

from bench.upstream import loop_factory, raise_fd_limit

now = time.perf_counter


@dataclass(slots=True)
class Exchange:
    """One request and what came back."""

    planned: float = 0.0
    sent: float = 0.0
    first: float = 0.0  # first body bytes holding the first-event marker (streams)
    end: float = 0.0
    status: int = 0
    events: int = 0
    bytes: int = 0
    ok: bool = False
    tail: bytes = b""


class ClientConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection; one exchange at a time."""

    def __init__(self, first_marker: bytes = b"data:") -> None:
        self.loop = asyncio.get_running_loop()
        self.first_marker = first_marker
        self.seen = b""  # the last bytes before the first event, in case a read splits it
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"bad response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if not exchange.first:
            marker = self.first_marker
            seen = self.seen + body
            if marker in seen:
                exchange.first = now()
            else:
                self.seen = seen[-len(marker) :]
        exchange.bytes += len(body)
        joined = exchange.tail + body[:1]
        exchange.events += body.count(b"\n\n") + (joined == b"\n\n")
        exchange.tail = body[-1:]

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.end = now()
            exchange.ok = exchange.status == 200
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, request: bytes, exchange: Exchange) -> Exchange:
        if self.transport is None or self.closed:
            raise ConnectionError("connection closed")
        self.exchange = exchange
        self.seen = b""
        self.waiter = self.loop.create_future()
        exchange.sent = now()
        if not exchange.planned:
            exchange.planned = exchange.sent
        self.transport.write(request)
        await self.waiter
        return exchange

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def build_request(spec: dict[str, Any]) -> bytes:
    body = orjson.dumps(spec["body"])
    return (
        b"POST %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b"
        % (
            spec["path"].encode(),
            spec["host"].encode(),
            spec["port"],
            spec.get("key", "sk-bench").encode(),
            len(body),
            body,
        )
    )


async def connect(spec: dict[str, Any]) -> ClientConnection:
    loop = asyncio.get_running_loop()
    marker = spec.get("first_marker", "data:").encode()
    _, protocol = await loop.create_connection(
        lambda: ClientConnection(marker), spec["host"], spec["port"]
    )
    return protocol


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 4) for v in values]


# --- modes -----------------------------------------------------------------------


async def run_closed(spec: dict[str, Any]) -> dict[str, Any]:
    request = build_request(spec)
    concurrency = spec.get("concurrency", 1)
    total = spec["requests"]
    warmup = spec.get("warmup", 0)
    deadline = now() + spec.get("duration", 60.0)
    started = 0
    window: list[float] = []  # [start of the measured window]
    latencies: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal started, failed
        conn = await connect(spec)
        try:
            while started < warmup + total and now() < deadline:
                started += 1
                measured = started > warmup
                if measured and not window:
                    window.append(now())
                exchange = await conn.send(request, Exchange())
                if not measured:
                    continue
                if exchange.ok:
                    latencies.append(exchange.end - exchange.sent)
                else:
                    failed += 1
        finally:
            conn.close()

    results = await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
    ended = now()
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    elapsed = ended - window[0] if window else 0.0
    return {
        "mode": "closed",
        "requested": total,
        "completed": len(latencies),
        "failed": failed + (total - len(latencies) - failed),
        "errors": errors[:3],
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "latency_ms": _ms(latencies),
    }


async def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    request = build_request(spec)
    count = spec["streams"]
    expect = spec.get("expect_events", 1)
    deadline = spec.get("duration", 120.0)
    gate = asyncio.Semaphore(spec.get("connect_parallel", 200))
    exchanges = [Exchange() for _ in range(count)]
    open_now = 0
    peak_open = 0
    connect_errors: list[str] = []

    async def one(exchange: Exchange) -> None:
        nonlocal open_now, peak_open
        async with gate:
            try:
                conn = await connect(spec)
            except OSError as exc:
                connect_errors.append(repr(exc))
                return
        open_now += 1
        peak_open = max(peak_open, open_now)
        try:
            await conn.send(request, exchange)
        except ConnectionError:
            exchange.ok = False
        finally:
            open_now -= 1
            conn.close()

    began = now()
    tasks = [asyncio.ensure_future(one(e)) for e in exchanges]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ended = now()
    done = [e for e in exchanges if e.ok and e.events >= expect and e.first]
    relay_rates = [
        (e.events - 1) / (e.end - e.first) for e in done if e.end > e.first and e.events > 1
    ]
    return {
        "mode": "streams",
        "requested": count,
        "completed": len(done),
        "failed": count - len(done),
        "errors": connect_errors[:3],
        "elapsed": ended - began,
        "peak_open": peak_open,
        "events": sum(e.events for e in done),
        "first_ms": _ms([e.first - e.sent for e in done]),
        "latency_ms": _ms([e.end - e.sent for e in done]),
        "events_per_s": relay_rates[0] if len(relay_rates) == 1 else None,
    }


async def run_open(spec: dict[str, Any]) -> dict[str, Any]:
    request = build_request(spec)
    rate = spec["rate"]
    duration = spec["duration"]
    timeout = spec.get("timeout", 30.0)
    total = int(rate * duration)
    idle: list[ClientConnection] = []
    exchanges: list[Exchange] = []
    opened = 0
    errors: list[str] = []

    async def one(exchange: Exchange) -> None:
        nonlocal opened
        conn = None
        while idle and conn is None:
            candidate = idle.pop()
            conn = None if candidate.closed else candidate
        try:
            if conn is None:
                conn = await connect(spec)
                opened += 1
            await asyncio.wait_for(conn.send(request, exchange), timeout)
        except (OSError, TimeoutError) as exc:
            exchange.ok = False
            if len(errors) < 3:
                errors.append(repr(exc))
            if conn is not None:
                conn.close()
            return
        idle.append(conn)

    loop = asyncio.get_running_loop()
    began = now()
    tasks = []
    for i in range(total):
        planned = began + i / rate
        delay = planned - now()
        if delay > 0:
            await asyncio.sleep(delay)
        exchange = Exchange(planned=planned)
        exchanges.append(exchange)
        tasks.append(loop.create_task(one(exchange)))
    offered_for = now() - began
    await asyncio.wait(tasks, timeout=timeout + 5)
    for conn in idle:
        conn.close()
    done = [e for e in exchanges if e.ok]
    return {
        "mode": "open",
        "requested": total,
        "completed": len(done),
        "failed": total - len(done),
        "errors": errors,
        "offered_rps": total / offered_for if offered_for else 0.0,
        "connections": opened,
        "latency_ms": _ms([e.end - e.planned for e in done]),
    }


MODES = {"closed": run_closed, "streams": run_streams, "open": run_open}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await MODES[spec["mode"]](spec)
    return result


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    spec = orjson.loads(args[0])
    raise_fd_limit()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(run(spec))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.buffer.write(orjson.dumps(result))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
