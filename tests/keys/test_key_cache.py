"""The key cache's own promises: bounded, never fed by unknown tokens, one query per burst."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from chat_api.store.keycache import KeyCache, KeySetVersion
from chat_api.store.keys import KeyRecord, hash_key


class CountingStore:
    """A key store that knows the keys it is given and counts the queries it answers."""

    def __init__(self, *secrets: str) -> None:
        self.known = set(secrets)
        self.queries = 0

    async def find(self, secret: str) -> KeyRecord | None:
        self.queries += 1
        await asyncio.sleep(0.01)  # a query takes a moment: lookups meanwhile must share it
        if secret not in self.known:
            return None
        fields = {name: None for name in KeyRecord.__dataclass_fields__}
        fields |= {"id": secret[-6:], "name": "k", "prefix": secret[:12], "models": ()}
        return KeyRecord(**fields | {"created_at": datetime.now(UTC)})


def _cache(store: CountingStore, **options: Any) -> KeyCache:
    return KeyCache(store, KeySetVersion(None, prefix="t:"), **options)  # type: ignore[arg-type]


def test_unknown_tokens_are_never_kept_and_the_cache_is_bounded() -> None:
    keys = [f"cak_{i:043d}" for i in range(5)]
    store = CountingStore(*keys)
    cache = _cache(store, max_entries=3)

    async def run() -> None:
        for token in [f"cak_unknown{i:036d}" for i in range(50)]:
            assert await cache.find(token, hash_key(token)) is None
        assert len(cache) == 0
        for key in keys:
            assert await cache.find(key, hash_key(key)) is not None
        assert len(cache) == 3  # the oldest made room

    asyncio.run(run())


def test_a_burst_of_lookups_of_one_key_makes_one_query() -> None:
    key = "cak_" + "b" * 43
    store = CountingStore(key)
    cache = _cache(store)

    async def run() -> None:
        found = await asyncio.gather(*(cache.find(key, hash_key(key)) for _ in range(200)))
        assert all(record is not None for record in found)
        assert store.queries == 1
        await cache.find(key, hash_key(key))  # cached: no query
        assert store.queries == 1

    asyncio.run(run())


def test_a_change_made_in_this_process_is_seen_by_the_next_lookup() -> None:
    key = "cak_" + "c" * 43
    store = CountingStore(key)
    version = KeySetVersion(None, prefix="t:")
    cache = KeyCache(store, version)  # type: ignore[arg-type]

    async def run() -> None:
        await cache.find(key, hash_key(key))
        await version.changed()  # what KeyStore.revoke does after its commit
        await cache.find(key, hash_key(key))
        assert store.queries == 2

    asyncio.run(run())
