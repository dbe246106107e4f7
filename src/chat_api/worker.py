"""The gunicorn worker class: uvicorn with the options `chat-api serve` uses (`SERVER_OPTIONS`)."""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from chat_api.serving import SERVER_OPTIONS


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type hints
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = dict(SERVER_OPTIONS)
