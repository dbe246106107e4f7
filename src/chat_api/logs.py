"""Logging: one line per call, plain or JSON, with every key scrubbed out.

The lines of a busy moment are written together (`BatchedStreamHandler`):
a write to stderr for every request cost about a tenth of a call's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TextIO

import orjson

from chat_api.redact import redact

log = logging.getLogger("chat_api")

_BLANK = logging.LogRecord("", 0, "", 0, "", (), None).__dict__
_RECORD_FIELDS = len(_BLANK)
_STANDARD = set(_BLANK) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured copy of the message
}


# Checked where they are made (a client's request id carrying a secret is replaced):
# left as they are, or 32-hex ids would be scrubbed as if they were Azure keys.
_ID_FIELDS = frozenset({"request_id", "upstream_request_id", "key_id"})


class RedactingFilter(logging.Filter):
    """Last line of defence: no key-like token leaves through a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ids_only", False):
            return True  # built from ids and numbers only (the access line): nothing to scrub
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD and name not in _ID_FIELDS and isinstance(value, str):
                setattr(record, name, redact(value))  # fields passed as `extra` too
        return True


class StopFilter(logging.Filter):
    """Drops uvicorn's report of a request that the server cancelled because it is stopping.

    Such a stream has already told its client (a last error event) and
    settled its call; uvicorn still logs the cancellation as "Exception in
    ASGI application" with some forty lines of traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.name == "uvicorn.error" and isinstance(error, asyncio.CancelledError))


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The fields passed as `extra`, in their order.

    A record's own attributes come first in its `__dict__` (`makeRecord` adds
    `extra` after them), so only what follows them is looked at.
    """
    for key, value in islice(record.__dict__.items(), _RECORD_FIELDS, None):
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


class _SecondsCache:
    """A record's time as text, worked out once a second rather than once a line.

    The second and its text are swapped in together (one assignment), so a
    line formatted on another thread at the same moment never gets the text
    of another second.
    """

    def __init__(self, fmt: str) -> None:
        self._fmt = fmt
        self._last: tuple[int, str] = (-1, "")

    def text(self, created: float) -> str:
        second = int(created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, time.strftime(self._fmt, time.localtime(second)))
        return last[1]


class LineFormatter(logging.Formatter):
    """A formatter whose lines can also be made from fields alone (`line`), without a record.

    `line` shows `fields` as given: a record's go through `_extras` first (no `_` ones).
    """

    def line(
        self, created: float, level: int, logger: str, message: str, fields: dict[str, Any]
    ) -> str:
        raise NotImplementedError


class JSONFormatter(LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = _SecondsCache("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(_extras(record))
        if record.exc_text:
            fields["error"] = record.exc_text
        return self.line(record.created, record.levelno, record.name, record.getMessage(), fields)

    def line(
        self, created: float, level: int, logger: str, message: str, fields: dict[str, Any]
    ) -> str:
        entry: dict[str, Any] = {
            "time": self._time.text(created),
            "level": logging.getLevelName(level).lower(),
            "logger": logger,
            "message": message,
        }
        entry.update(fields)
        return orjson.dumps(entry, default=str).decode()


class PlainFormatter(LineFormatter):
    """`12:00:00 INFO chat_api.access: request request_id=... status=200 ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self._time = _SecondsCache("%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time.text(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)  # with the traceback, if any
        return line + _plain_fields(_extras(record))

    def line(
        self, created: float, level: int, logger: str, message: str, fields: dict[str, Any]
    ) -> str:
        head = f"{self._time.text(created)} {logging.getLevelName(level)} {logger}: {message}"
        return head + _plain_fields(fields.items())


def _plain_fields(fields: Iterable[tuple[str, Any]]) -> str:
    text = " ".join(f"{key}={value}" for key, value in fields if value is not None)
    return " " + text if text else ""


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the access lines of a busy moment together.

    An access line (`add_fields`, one a request) logged on the event loop
    waits at most `FLUSH_AFTER` seconds, or until `MAX_WAITING` lines wait,
    and goes out with the others in one write: a write to stderr for every
    request cost several per cent of a call's CPU. Every other line is
    written at once, after the access lines that wait, so the order holds
    and the lines a stop writes last (uvicorn's "Application shutdown
    complete.") take the waiting ones out with them. A killed process loses
    at most the last `FLUSH_AFTER` seconds of access lines.
    """

    FLUSH_AFTER = 0.1
    MAX_WAITING = 500

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            with self.lock:  # type: ignore[union-attr]
                self._waiting.append(line)
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def add_fields(self, level: int, logger: str, message: str, fields: dict[str, Any]) -> None:
        """An access line made from fields, without a record (`sole_handler`); it may wait."""
        formatter = self.formatter
        assert isinstance(formatter, LineFormatter)
        line = formatter.line(time.time(), level, logger, message, fields)
        with self.lock:  # type: ignore[union-attr]
            self._waiting.append(line)
            if len(self._waiting) >= self.MAX_WAITING:
                self.flush()
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            if self._timer_loop is not loop:  # none yet, or one on a loop that may be gone
                if self._timer_loop is not None:
                    self.flush()  # waiting for a timer on another loop: not any longer
                self._timer_loop = loop
                loop.call_later(self.FLUSH_AFTER, self._flush_from_timer)

    def _flush_from_timer(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._timer_loop = None
            self.flush()

    def flush(self) -> None:
        """Write what waits. A stream that fails (a closed or full pipe) is reported as
        `logging` reports any handler's failure, and never raised into the request that
        logged: those lines are lost."""
        with self.lock:  # type: ignore[union-attr]
            waiting, self._waiting = self._waiting, []
            try:
                if waiting:
                    self.stream.write("\n".join(waiting) + "\n")
                super().flush()
            except Exception:
                if waiting:  # nothing lost otherwise (a stream closed at exit, say): quiet
                    _report_write_failure(len(waiting))


def _report_write_failure(lines: int) -> None:
    """What `Handler.handleError` does, without a record: a traceback on the real stderr."""
    if logging.raiseExceptions and sys.__stderr__ is not None:
        with contextlib.suppress(Exception):  # stderr itself is gone: nothing more to do
            sys.__stderr__.write(f"--- Logging error: {lines} log lines could not be written ---\n")
            traceback.print_exc(file=sys.__stderr__)


def sole_handler(logger: logging.Logger) -> BatchedStreamHandler | None:
    """The handler `configure` set up, when every line of `logger` goes there and nowhere else.

    Then a line built from ids and numbers only (the access line, once a
    request) can be formatted and queued there directly, without a
    LogRecord: the handler's filters would pass it unchanged. Anywhere else
    (tests' capture handlers, a logger set up otherwise) it goes through
    `logging` as usual.
    """
    parent = logger.parent
    if logger.handlers or logger.filters or not logger.propagate or parent is None:
        return None
    if parent.filters or parent.propagate or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if not isinstance(handler, BatchedStreamHandler) or handler.level > logging.DEBUG:
        return None
    if not isinstance(handler.formatter, LineFormatter):
        return None
    if any(not isinstance(f, OWN_FILTERS) for f in handler.filters):
        return None  # a filter someone added would be skipped
    return handler


OWN_FILTERS = (StopFilter, RedactingFilter)  # what they do to an access line: nothing


def configure(level: str, fmt: str) -> None:
    """Route our logs and uvicorn's through one scrubbing handler."""
    # Our lines never show the source line, thread or process: skip finding them
    # for every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedStreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(StopFilter())  # before RedactingFilter, which turns exc_info into text
    handler.addFilter(RedactingFilter())
    for name in ("chat_api", "uvicorn", "uvicorn.error", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(level.upper())
    for name in ("openai", "httpx2", "httpx", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
