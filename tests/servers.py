"""Run an ASGI app on a real uvicorn, on 127.0.0.1 and a free port, in a thread."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any

import uvicorn


class ServerThread:
    """httpx's TestServer pattern: a real server the test talks to over real sockets."""

    def __init__(self, app: Any, **config: Any) -> None:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "log_config": None,
            "access_log": False,
            "ws": "none",
            "lifespan": "on",
            "timeout_graceful_shutdown": 1,
            "proxy_headers": False,  # as the gateway is served (chat_api.serving.SERVER_OPTIONS)
            **config,
        }
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            frame = sys._current_frames().get(self.thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame else "?"
            raise RuntimeError(f"the test server did not stop within 30 s; it was at:\n{where}")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
