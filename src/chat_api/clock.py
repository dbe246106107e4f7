"""The wall clock that limits, budgets and key expiry read.

One seam: minute windows, budget periods, key expiry, call leases and
in-flight holds all ask `now()` (seconds since the epoch) or `utcnow()`,
so a test can move time forward instead of waiting for it (see
tests/clock.py). Durations measured inside one process (timeouts, retries)
keep using `time.monotonic()`, which no test needs to move.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now() -> float:
    return time.time()


def utcnow() -> datetime:
    return datetime.fromtimestamp(now(), UTC)
