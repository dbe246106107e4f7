"""Work that calls asking at the same moment share: one run, one outcome for all of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class SharedWork:
    """`run(key, work)`: while a run for `key` is on its way, later callers wait for it.

    The run is shielded: a caller that leaves does not stop it for the others.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[None]] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable[None]]) -> None:
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(work())
            running.add_done_callback(lambda _: self._running.pop(key, None))
        await asyncio.shield(running)

    def cancel(self) -> None:
        """Stop the runs on their way (at shutdown: nobody is left to wait for them)."""
        for running in list(self._running.values()):
            running.cancel()
