"""The log lines themselves: the access line's two ways out, and how lines are written."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from chat_api import logs
from chat_api.access_log import RequestObserver
from chat_api.metrics import Metrics

NAMES = ("chat_api", "uvicorn", "uvicorn.error", "gunicorn.error")
FIELDS = {
    "request_id": "req-1",
    "client": "127.0.0.1",
    "method": "POST",
    "route": "/v1/chat/completions",
    "status": 200,
    "latency_ms": 1.25,
    "key_id": "key_1",
    "model": "gpt-4o-mini",
    "outcome": "ok",
    "prompt_tokens": 9,
    "completion_tokens": None,
    "estimated": False,
}


class Counting(io.StringIO):
    """A stream that counts the writes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


Setup = Callable[[str], tuple[logs.BatchedStreamHandler, Counting]]


@pytest.fixture
def service_logs() -> Iterator[Setup]:
    """`logs.configure` as the service runs it, writing to a counting stream; restored after.

    Called in the test's body: pytest adds its capture handlers to the loggers
    when a test starts, which would send the access line through `logging`.
    """
    saved = {n: (logging.getLogger(n).handlers, logging.getLogger(n).propagate) for n in NAMES}
    levels = {n: logging.getLogger(n).level for n in NAMES}

    def setup(fmt: str) -> tuple[logs.BatchedStreamHandler, Counting]:
        logs.configure("info", fmt)
        handler = logging.getLogger("chat_api").handlers[0]
        assert isinstance(handler, logs.BatchedStreamHandler)
        stream = Counting()
        handler.setStream(stream)
        return handler, stream

    yield setup
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(levels[name])


def _without_time(line: str) -> str:
    if line.startswith("{"):
        entry = json.loads(line)
        entry.pop("time")
        return json.dumps(entry)
    return line.split(" ", 1)[1]


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_an_access_line_reads_the_same_without_a_record(service_logs: Setup, fmt: str) -> None:
    handler, stream = service_logs(fmt)
    access = logging.getLogger("chat_api.access")
    assert logs.sole_handler(access) is handler

    access.info("request", extra={"_ids_only": True, **FIELDS})  # through a LogRecord
    handler.add_fields(logging.INFO, "chat_api.access", "request", FIELDS)  # off the loop: now
    through_record, direct = stream.getvalue().splitlines()

    assert _without_time(direct) == _without_time(through_record)
    if fmt == "plain":
        assert direct.split(" ", 1)[1] == (
            "INFO chat_api.access: request request_id=req-1 client=127.0.0.1 method=POST "
            "route=/v1/chat/completions status=200 latency_ms=1.25 key_id=key_1 "
            "model=gpt-4o-mini outcome=ok prompt_tokens=9 estimated=False"
        )
    else:
        entry = json.loads(direct)
        assert entry["level"] == "info" and entry["logger"] == "chat_api.access"
        assert {k: entry[k] for k in FIELDS} == FIELDS and "_ids_only" not in entry


def test_a_capture_handler_still_gets_records(service_logs: Setup) -> None:
    """A handler of its own on the access logger (a test's capture): no direct lines."""
    _, stream = service_logs("plain")
    access = logging.getLogger("chat_api.access")
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]
    access.addHandler(capture)
    try:
        assert logs.sole_handler(access) is None
        scope = {"route": None, "state": {"request_id": "req-2"}, "client": ("10.0.0.9", 1)}
        RequestObserver(Metrics(None))(scope | {"method": "GET"}, 404, 0.002)
    finally:
        access.removeHandler(capture)
    assert [getattr(r, "request_id", None) for r in records] == ["req-2"]
    assert "request_id=req-2" in stream.getvalue()  # and the service's own line as well


def test_access_lines_of_a_busy_moment_go_out_in_one_write(service_logs: Setup) -> None:
    handler, stream = service_logs("plain")
    observe = RequestObserver(Metrics(None))

    async def busy_moment() -> tuple[int, int, str]:
        for i in range(50):
            scope = {"route": None, "state": {"request_id": f"r{i}"}, "client": ("1.2.3.4", 1)}
            observe(scope | {"method": "POST"}, 200, 0.001)
        waiting = stream.writes
        await asyncio.sleep(handler.FLUSH_AFTER * 2)
        after_wait, text = stream.writes, stream.getvalue()
        logging.getLogger("chat_api.access").info("request", extra={"_ids_only": True})
        return waiting, after_wait, text

    waiting, after_wait, text = asyncio.run(busy_moment())
    assert waiting == 0  # nothing written while the moment lasts
    assert after_wait == 1  # then all fifty in one write
    assert [line.split("request_id=")[1].split()[0] for line in text.splitlines()] == [
        f"r{i}" for i in range(50)
    ]


def test_other_lines_are_written_at_once_after_the_waiting_ones(service_logs: Setup) -> None:
    handler, stream = service_logs("plain")

    async def moment() -> str:
        handler.add_fields(logging.INFO, "chat_api.access", "request", {"request_id": "first"})
        logging.getLogger("uvicorn.error").info("Application shutdown complete.")
        return stream.getvalue()  # no waiting: a process may end right after this line

    lines = asyncio.run(moment()).splitlines()
    assert "request_id=first" in lines[0]
    assert lines[1].endswith("INFO uvicorn.error: Application shutdown complete.")


def test_many_waiting_lines_or_no_event_loop_are_written_at_once(service_logs: Setup) -> None:
    handler, stream = service_logs("plain")
    handler.add_fields(logging.INFO, "chat_api.access", "request", {"request_id": "off-loop"})
    assert stream.writes == 1  # no event loop: no timer to wait for

    async def flood() -> int:
        for i in range(handler.MAX_WAITING):
            handler.add_fields(logging.INFO, "chat_api.access", "request", {"request_id": str(i)})
        return stream.writes

    assert asyncio.run(flood()) == 2  # the 500th line took all 500 out in one write


def test_a_stream_that_fails_never_fails_the_request(
    service_logs: Setup, capfd: pytest.CaptureFixture[str]
) -> None:
    """A full or closed stderr pipe: the lines are lost and said to be, the request goes on."""
    handler, _ = service_logs("plain")

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise BlockingIOError("stderr is full")

    handler.setStream(Full())
    handler.add_fields(logging.INFO, "chat_api.access", "request", {"request_id": "lost"})
    logging.getLogger("chat_api").warning("and this one")  # through a record: no raise either
    assert "--- Logging error: 1 log lines could not be written ---" in capfd.readouterr().err


def test_a_filter_added_to_the_handler_gets_every_line(service_logs: Setup) -> None:
    """The direct way skips the handler's filters: only while they are the service's own."""
    handler, stream = service_logs("plain")
    access = logging.getLogger("chat_api.access")
    assert logs.sole_handler(access) is handler
    handler.addFilter(lambda record: "hide-me" not in str(getattr(record, "request_id", "")))
    assert logs.sole_handler(access) is None
    scope = {"route": None, "state": {"request_id": "hide-me"}, "client": ("1.2.3.4", 1)}
    RequestObserver(Metrics(None))(scope | {"method": "GET"}, 200, 0.001)
    assert "hide-me" not in stream.getvalue()
