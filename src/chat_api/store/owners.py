"""Who owns each stored response and conversation: the key that created it.

OpenAI keeps stored responses and conversations per organisation, so any
client key could read, continue or delete another key's objects through the
gateway. The gateway records the creating key of every id it hands out and
answers 404 to anyone else. `key_id` is None for objects made with the master
key, or while client keys are off.

Each row also counts the images and PDF pages the object's context holds
(`media`): a response that continues it has them read again, and billed
again, so its reservation must include them. A response's count is fixed
when it is stored (what it continued, plus its own input); a conversation's
grows with every input added to it, counted before the input is sent and
read in the same statement (`count_into`), on whichever replica; taken back
(`take_back`) if the call was refused before it reached OpenAI, or by
OpenAI, and kept if it failed any other way, as it may have run.

An owner never changes once recorded, so lookups are cached in process (an
LRU of the most recent ids). Only ids that exist are cached: an id unknown
here may be recorded a moment later by another replica. A cached owner that
another replica has since forgotten is harmless: the object is gone upstream
too, so its owner gets OpenAI's 404 and everyone else the gateway's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from chat_api.errors import ServiceUnavailable
from chat_api.store.database import answering, as_utc, utcnow
from chat_api.store.schema import owners

Kind = Literal["response", "conversation"]
KINDS: frozenset[str] = frozenset(get_args(Kind))
log = logging.getLogger("chat_api.owners")
CACHE_SIZE = 10_000  # ~2 MB of recent owners


@dataclass(frozen=True, slots=True)
class Owner:
    object_id: str
    kind: Kind
    key_id: str | None
    created_at: datetime
    # Images and PDF pages in its context. A conversation's grows after it is recorded: this
    # is the count it had then (cached), never to be read for money; `count_into` reads it.
    media: int = 0

    @classmethod
    def from_row(cls, row: RowMapping) -> Owner:
        created = as_utc(row["created_at"])
        assert created is not None  # the column is NOT NULL
        return cls(row["object_id"], row["kind"], row["key_id"], created, row["media"])


class OwnerStore:
    """The `owners` table, with a small cache in front of it."""

    def __init__(
        self, engine: AsyncEngine, *, cache_size: int = CACHE_SIZE, timeout: float | None = None
    ) -> None:
        self._engine = engine
        self._timeout = timeout  # CHAT_API_DATABASE_TIMEOUT: a hung database is a 503, soon
        self._cache: OrderedDict[str, Owner] = OrderedDict()
        self._cache_size = cache_size
        self._writing: set[asyncio.Task[None]] = set()

    async def record(self, object_id: str, kind: Kind, key_id: str | None, media: int = 0) -> Owner:
        """Note that `key_id` created `object_id`, whose context holds `media` images and
        PDF pages; the first record of an id stands.

        Recording an id again (a retried call, a second replica) changes
        nothing and answers the owner already on file.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
        owner = Owner(object_id, kind, key_id, utcnow(), media)
        inserted = await answering(
            self._timeout, "Ownership cannot be recorded", self._insert(owner)
        )
        if not inserted:
            existing = await self._load(object_id)
            if existing is None:  # recorded and forgotten in between: record it anew
                return await self.record(object_id, kind, key_id, media)
            self._remember(existing)
            return existing
        self._remember(owner)
        return owner

    async def _insert(self, owner: Owner) -> bool:
        """Whether the row went in (False: the id was recorded already)."""
        try:
            async with self._engine.begin() as connection:
                await connection.execute(
                    insert(owners).values(
                        object_id=owner.object_id,
                        kind=owner.kind,
                        key_id=owner.key_id,
                        created_at=owner.created_at,
                        media=owner.media,
                    )
                )
        except IntegrityError:
            return False
        return True

    def record_soon(self, object_id: str, kind: Kind, key_id: str | None, media: int = 0) -> None:
        """Known to this process at once; written to the database in the background.

        For a stream: awaiting the write before relaying the first text cost
        its p99 seconds with hundreds of streams opening at once (bench/).
        """
        self._remember(Owner(object_id, kind, key_id, utcnow(), media))
        task = asyncio.get_running_loop().create_task(
            self._record_quietly(object_id, kind, key_id, media)
        )
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _record_quietly(
        self, object_id: str, kind: Kind, key_id: str | None, media: int
    ) -> None:
        try:
            await self.record(object_id, kind, key_id, media)
        except Exception as exc:  # the cache still knows; other replicas will not
            log.warning("could not record an owner", extra={"error": type(exc).__name__})

    async def count_into(self, object_id: str, parts: int) -> int:
        """Count `parts` more images and PDF pages into a conversation; what it held before.

        One statement reads and adds, so two calls at once each see the
        other's count, whichever adds first. A database that is away is a 503
        (this runs before a call is sent). An id with no row (made before the
        gateway counted, or not through it) holds none.
        """
        return await answering(
            self._timeout, "Ownership cannot be checked", self._change_count(object_id, parts)
        )

    async def take_back(self, object_id: str, parts: int) -> None:
        """Take back a count whose call never ran; a database away then is only logged."""
        try:
            await answering(
                self._timeout, "Ownership cannot be changed", self._change_count(object_id, -parts)
            )
        except ServiceUnavailable:
            log.warning("could not take back a conversation's images", extra={"parts": parts})

    async def _change_count(self, object_id: str, parts: int) -> int:
        """Add `parts` (none: only read) and answer the count before them."""
        column = owners.c.media
        async with self._engine.begin() as connection:
            if parts == 0:
                found = await connection.execute(
                    select(column).where(owners.c.object_id == object_id)
                )
            else:
                found = await connection.execute(
                    update(owners)
                    .where(owners.c.object_id == object_id)
                    .values(media=column + parts)
                    .returning(column)
                )
            total = found.scalar()
        return int(total) - parts if total is not None else 0

    async def drain(self) -> None:
        """Wait for owners still being written (at shutdown)."""
        while self._writing:
            await asyncio.gather(*list(self._writing), return_exceptions=True)

    async def owner_of(self, object_id: str) -> Owner | None:
        """Who created `object_id`, or None when the gateway never handed it out."""
        cached = self._cache.get(object_id)
        if cached is not None:
            self._cache.move_to_end(object_id)
            return cached
        owner = await self._load(object_id)
        if owner is not None:
            self._remember(owner)
        return owner

    async def forget(self, object_id: str) -> None:
        """The object was deleted: drop its row and its cache entry."""
        self._cache.pop(object_id, None)
        await answering(self._timeout, "Ownership cannot be changed", self._delete(object_id))

    async def _delete(self, object_id: str) -> None:
        async with self._engine.begin() as connection:
            await connection.execute(delete(owners).where(owners.c.object_id == object_id))

    async def _load(self, object_id: str) -> Owner | None:
        return await answering(
            self._timeout, "Ownership cannot be checked", self._select(object_id)
        )

    async def _select(self, object_id: str) -> Owner | None:
        async with self._engine.connect() as connection:
            result = await connection.execute(select(owners).where(owners.c.object_id == object_id))
            row = result.mappings().first()
        return Owner.from_row(row) if row is not None else None

    def _remember(self, owner: Owner) -> None:
        self._cache[owner.object_id] = owner
        self._cache.move_to_end(owner.object_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
