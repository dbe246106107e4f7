"""Client keys cached in each process, and how every process learns that a key changed.

A request with a client key costs no database query: the key's record is
kept in this process once read. A revocation must still be refused on the
very next request on every replica, so a cached record is trusted only while
the key set's version it was read under is still the current one.

- **With Redis**, the version is a random token at `<prefix>keys:version`,
  replaced after every change by whoever made it (the admin API of any
  replica, or `chat-api keys revoke`), after the change is committed. A
  request that starts a call (chat, responses, embeddings) takes its key
  from the cache as is (`cached`), and admission checks the version in the
  same Redis round trip as the key's limits; when it changed, the key is
  read again (`recheck`) before anything is counted. Every other request
  reads the version first (one GET). A token rather than a counter: if Redis loses
  its data, a counter starts again at numbers processes have already seen; a
  token never comes back. A missing version (Redis restarted empty) is set
  to a fresh token, so every cache starts over.
- **Without Redis**, or while Redis cannot be reached, a cached record is
  trusted for at most `SHORT_TTL` (1 s) after it was read. A change made
  through this process's admin API empties its cache at once; one made by
  the CLI or by another worker process is seen within that second.
- Whatever happens, a record is read again after `MAX_AGE` (60 s): a change
  that could not be announced (Redis away at that moment) is not ignored
  for longer than that.

Only keys that exist are cached, at most `MAX_ENTRIES`: an unknown token
always goes to the database (and counts as a failed attempt), so random
tokens cannot fill memory. Lookups of one key at the same moment share one
query. Expiry is checked on every request against the cached expiry time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_api.calls import Caller
from chat_api.store.keys import KeyRecord, KeyStore
from chat_api.store.shared import Reachability

log = logging.getLogger("chat_api.keys")

SHORT_TTL = 1.0
MAX_AGE = 60.0
MAX_ENTRIES = 10_000

Version = tuple[int, bytes | None]  # (changes made in this process, the shared token)


def _fresh_token() -> bytes:
    return secrets.token_hex(16).encode()


class KeySetVersion:
    """The version of the whole key set: it changes whenever any key changes."""

    def __init__(
        self, redis: Redis | None, *, prefix: str, reach: Reachability | None = None
    ) -> None:
        self._redis = redis
        self.key = f"{prefix}keys:version"
        self.local = 0
        self._reach = reach if reach is not None else Reachability(redis)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    async def current(self) -> Version:
        """This process's changes, and the shared token (None without Redis, or while away)."""
        redis = self._redis
        if redis is None or self._reach.away:
            return self.local, None
        try:
            token = await redis.get(self.key)
            if token is None:  # a new Redis, or one that lost its data
                await redis.set(self.key, _fresh_token(), nx=True)
                token = await redis.get(self.key)
        except (RedisError, OSError) as exc:
            if self._reach.went_down():
                log.warning(
                    "Redis unreachable: cached keys are trusted for %g s at a time",
                    SHORT_TTL,
                    extra={"error": type(exc).__name__},
                )
            return self.local, None
        return self.local, token if isinstance(token, bytes) else None

    async def changed(self) -> None:
        """Announce a committed change: this process at once, the others through Redis.

        Raises `RedisError`/`OSError` when Redis cannot be told; the caller
        says so (every cache still reads the key again within `MAX_AGE`).
        """
        self.local += 1
        if self._redis is not None:
            await self._redis.set(self.key, _fresh_token())


@dataclass(frozen=True, slots=True)
class _Entry:
    record: KeyRecord
    version: Version
    read_at: float
    caller: Caller  # what the record lets through, under this version: built once, not per call


class KeyCache:
    """`find` for the request path: the key store, remembered. See the module docstring."""

    def __init__(
        self, keys: KeyStore, version: KeySetVersion, *, max_entries: int = MAX_ENTRIES
    ) -> None:
        self._keys = keys
        self._version = version
        self._max = max_entries
        self._entries: dict[str, _Entry] = {}
        self._seen: Version = (0, None)
        self._loading: dict[tuple[str, Version], asyncio.Future[KeyRecord | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, digest: str) -> tuple[KeyRecord, Caller] | None:
        """A key already in the cache, with the shared version to check it against; no I/O.

        Only with Redis, and only for a request whose admission checks that
        version in its own round trip (the caller carries it): None sends the
        caller to `find`.
        """
        token = self._seen[1]
        if token is None or self._seen[0] != self._version.local:
            return None
        entry = self._entries.get(digest)
        if entry is None or entry.version != self._seen:
            return None
        if time.monotonic() - entry.read_at >= MAX_AGE:
            return None
        return entry.record, entry.caller

    async def recheck(self, key_id: str) -> KeyRecord | None:
        """The key read again, after admission found that the key set changed."""
        self._adopt(await self._version.current())
        return await self._keys.get(key_id)

    def _adopt(self, version: Version) -> None:
        if version != self._seen:
            self._entries.clear()  # something changed (or Redis came or went): start over
            self._seen = version

    async def find(self, secret: str, digest: str) -> KeyRecord | None:
        """The key whose secret this is (its SHA-256 is `digest`), usable or not; None if none."""
        version = await self._version.current()
        self._adopt(version)
        entry = self._entries.get(digest)
        if entry is not None:
            age = time.monotonic() - entry.read_at
            if entry.version == version and age < (MAX_AGE if version[1] else SHORT_TTL):
                return entry.record
            del self._entries[digest]
        return await self._load(secret, digest, version)

    async def _load(self, secret: str, digest: str, version: Version) -> KeyRecord | None:
        loading = self._loading.get((digest, version))
        if loading is None:
            loading = asyncio.ensure_future(self._read(secret, digest, version))
            self._loading[(digest, version)] = loading
            loading.add_done_callback(lambda _: self._loading.pop((digest, version), None))
        # Shielded: one waiter giving up (its client left) does not fail the others.
        return await asyncio.shield(loading)

    async def _read(self, secret: str, digest: str, version: Version) -> KeyRecord | None:
        read_at = time.monotonic()
        record = await self._keys.find(secret)
        # Kept only if nothing changed meanwhile: a record read before a
        # revocation must not be remembered under the version after it.
        if record is not None and version == self._seen:
            if len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]  # the oldest
            caller = record.caller(key_version=version[1])
            self._entries[digest] = _Entry(record, version, read_at, caller)
        return record
