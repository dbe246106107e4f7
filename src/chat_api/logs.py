"""Logging: one line per call, plain or JSON, with every key scrubbed out."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import orjson

from chat_api.redact import redact

log = logging.getLogger("chat_api")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
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


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_text:
            entry["error"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def configure(level: str, fmt: str) -> None:
    """Route our logs and uvicorn's through one scrubbing handler."""
    # Our lines never show the source line, thread or process: skip finding them
    # for every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
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
