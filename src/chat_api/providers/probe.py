"""What `/ready` asks of the upstream, and the timed check every readiness test goes through."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from chat_api.config import OPENAI_V1, Settings

CHECK_SECONDS = 2.0
PROBE_EVERY = 10.0  # seconds a probe of the upstream's address is trusted


class UpstreamProbe:
    """Whether the upstream's address takes a TCP connection, asked at most every `every` seconds.

    Cheap (no request is sent, so no key and no bill) and asked by `/ready`
    alone, never on a chat call's path. Through a proxy (`HTTPS_PROXY` and
    friends, as the upstream client uses them) it is the proxy that is asked.
    """

    def __init__(
        self, url: str, *, every: float = PROBE_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        try:
            proxy, _ = get_env_proxy_for_url(URL(url))
        except LookupError:
            proxy = None
        target = urlsplit(str(proxy) if proxy is not None else url)
        self.host = target.hostname or ""
        self.port = target.port or (443 if target.scheme == "https" else 80)
        self._every = every
        self._clock = clock
        self._checked_at: float | None = None
        self._status = ""
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, settings: Settings) -> UpstreamProbe:
        return cls(settings.openai_base_url or OPENAI_V1)

    async def status(self) -> str:
        async with self._lock:  # callers at the same moment share one probe
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._every:
                self._status = await check(self._connect())
                if self._status != "ok":
                    self._status += f" (cannot connect to {self.host}:{self.port})"
                self._checked_at = now
            return self._status

    async def _connect(self) -> None:
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def check(work: Awaitable[object]) -> str:
    """ "ok", or "failing: <what was raised>" when `work` fails or takes over `CHECK_SECONDS`."""
    try:
        await asyncio.wait_for(work, CHECK_SECONDS)
    except Exception as exc:
        return f"failing: {type(exc).__name__}"
    return "ok"
