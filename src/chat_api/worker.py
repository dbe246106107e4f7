"""The gunicorn worker class: uvicorn with uvloop and the header deadline."""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from chat_api.protocol import GuardedHttpToolsProtocol


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type hints
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "uvloop", "http": GuardedHttpToolsProtocol}
