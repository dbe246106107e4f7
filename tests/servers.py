"""Run an ASGI app on a real uvicorn, on 127.0.0.1 and a free port, in a thread."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import traceback
import types
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run


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
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.left: list[str] = []  # tasks still running once the app had shut down
        self.sockets: list[str] = []  # connections still open once the app had shut down

    def _run(self) -> None:
        async def serve() -> None:
            await self.server.serve()
            here = asyncio.current_task()
            self.left = sorted(t.get_name() for t in asyncio.all_tasks() if t is not here)
            self.sockets = _close_open_sockets(asyncio.get_running_loop())

        asyncio_run(serve(), loop_factory=self.server.config.get_loop_factory())

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
        # A task that outlives the app's shutdown may reach Redis or the database after
        # they closed (and open a connection nothing closes).
        assert not self.left, f"tasks still running after the server shut down: {self.left}"
        assert not self.sockets, f"connections left open after the server shut down: {self.sockets}"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TRANSPORTS = frozenset({"TCPTransport", "UnixTransport", "_SelectorSocketTransport"})


def _close_open_sockets(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Name and close the connections of `loop` still open after its app shut down.

    One nothing closes makes uvloop's `loop.close()` wait forever once pytest
    turns its "unclosed transport" warning into an error: the test would hang
    for 30 s without saying which connection it was.
    """
    # By type name: `isinstance` wakes up lazy module proxies (seconds).
    open_ = [t for t in gc.get_objects() if type(t).__name__ in _TRANSPORTS and not t.is_closing()]
    found = []
    for thing in open_:
        protocol = thing.get_protocol()
        if loop not in (getattr(protocol, "_loop", None), getattr(protocol, "loop", None)):
            continue  # another thread's (the fake upstream's, say)
        ends = thing.get_extra_info("sockname"), thing.get_extra_info("peername")
        kind = f"{type(protocol).__module__}.{type(protocol).__qualname__}"
        found.append(f"{kind} {ends[0]} -> {ends[1]}, held by {_holders(thing, open_)}")
        thing.abort()
    return sorted(found)


def _holders(transport: object, ours: list[Any], depth: int = 4) -> str:
    """Who holds a transport left open, by type, a few steps up (`StreamWriter <-
    Connection <- …`): enough to tell a pool's connection from one nothing keeps."""
    chain: list[str] = []
    thing, seen = transport, [ours]
    for _ in range(depth):
        holders = [
            h
            for h in gc.get_referrers(thing)
            if not isinstance(h, types.FrameType) and all(h is not s for s in seen)
        ]
        if not holders:
            break
        seen.append(holders)
        thing = next((h for h in holders if not isinstance(h, dict)), holders[0])
        chain.append(type(thing).__qualname__)
    return " <- ".join(chain) or "nothing"
