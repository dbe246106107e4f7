"""Who is calling: the master key, a client key, or nobody we know.

Every failure looks the same (401), whether the key is missing, wrong,
expired or revoked. An address that fails too often in a minute is told to
wait (429) for its next failures, while a valid key from that address is
always let in: behind a proxy or a NAT, many people share one address, and
one of them guessing must not lock out the others. The address is the real
client's (`CHAT_API_TRUSTED_PROXIES` says whose `X-Forwarded-For` to believe).
Client keys come from the process's `KeyCache`: no database query per
request, and still every revocation refused from the next request on (see
store/keycache.py). A request that starts a call (`call=True`) leaves the
check that the key set did not change to admission, which makes it in the
round trip it makes anyway (`recheck` is its way back here).
"""

from __future__ import annotations

import hmac
import math
import time

from fastapi import Request

from chat_api.calls import Caller
from chat_api.config import Settings
from chat_api.errors import RateLimited, Unauthorized
from chat_api.limits.counters import Counter
from chat_api.store.database import utcnow
from chat_api.store.keycache import KeyCache
from chat_api.store.keys import KEY_PREFIX, hash_key

MASTER = Caller(key_id=None, name="master")
MAX_BLOCKED = 10_000


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Guard:
    def __init__(self, settings: Settings, keys: KeyCache, counter: Counter) -> None:
        assert settings.master_key is not None
        self._master = hash_key(settings.master_key.get_secret_value())
        self._keys = keys
        self._counter = counter
        self._per_minute = settings.auth_failures_per_minute
        self._blocked: dict[str, float] = {}

    async def authenticate(self, request: Request, *, call: bool = False) -> Caller:
        address = request.client.host if request.client else "unknown"
        token = bearer_token(request.headers.get("authorization"))
        if token is not None:
            digest = hash_key(token)
            if hmac.compare_digest(digest, self._master):
                return MASTER
            if token.startswith(KEY_PREFIX):
                cached = self._keys.cached(digest) if call else None
                if cached is not None and cached[0].usable(utcnow()):
                    return cached[1]
                # A database that is away or stalled is a 503 (try again), never a 500.
                record = await self._keys.find(token, digest)
                if record is not None and record.usable(utcnow()):
                    return record.caller()
        await self._failed(address)
        raise Unauthorized()

    async def recheck(self, caller: Caller) -> Caller:
        """The caller read again because the key set changed since its key was cached."""
        assert caller.key_id is not None
        record = await self._keys.recheck(caller.key_id)
        if record is None or not record.usable(utcnow()):
            raise Unauthorized()
        return record.caller()

    async def _failed(self, address: str) -> None:
        """Count a failure; past the limit, the address waits (429) out the minute."""
        now = time.monotonic()
        blocked_until = self._blocked.get(address)
        if blocked_until is not None:
            if blocked_until > now:
                raise self._slow_down(blocked_until - now)
            del self._blocked[address]
        hit = await self._counter.hit(f"authfail:{address}", 1, self._per_minute)
        if not hit.allowed:
            if (
                len(self._blocked) >= MAX_BLOCKED
            ):  # many addresses: forget the ones whose wait is over
                self._blocked = {a: t for a, t in self._blocked.items() if t > now}
            self._blocked[address] = now + hit.reset_in
            raise self._slow_down(hit.reset_in)

    @staticmethod
    def _slow_down(seconds: float) -> RateLimited:
        return RateLimited(
            "Too many failed attempts with a wrong key from your address. "
            f"Try again in {math.ceil(seconds)} seconds.",
            retry_after=seconds,
            reason="too_many_failed_attempts",
        )
