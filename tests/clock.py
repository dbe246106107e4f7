"""Moving the gateway's wall clock (`chat_api.clock`) instead of waiting for it.

Gateways in tests run in this process (tests/servers.py), so shifting the
clock here moves every minute window, budget period, key expiry and lease
they read. Gateways in their own processes (the cluster tests) keep the
real clock: `avoid_minute_edge` waits out the end of a minute for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from chat_api import clock


class Clock:
    """The real clock plus an offset that only grows: `advance`, or `to_minute_start`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def to_minute_start(self, margin: float = 0.5) -> None:
        """Jump to just after the start of the next clock minute (a fresh rate window)."""
        self.advance(60 - self.now() % 60 + margin)

    def to_next_day(self, margin: float = 1.0) -> None:
        """Jump to just after the next midnight UTC (a fresh daily budget)."""
        self.advance(86_400 - self.now() % 86_400 + margin)


@pytest.fixture
def moved_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """A clock the test moves; every in-process gateway reads it."""
    moved = Clock()
    monkeypatch.setattr(clock, "now", moved.now)
    yield moved


def avoid_minute_edge(margin: float = 4.0) -> None:
    """For gateways in other processes (real clock): start a counting test well inside a minute.

    It sleeps, up to `margin` seconds; in-process gateways use `moved_clock` instead.
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.2)
