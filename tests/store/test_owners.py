"""Owners of stored responses and conversations, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from chat_api.errors import ServiceUnavailable
from chat_api.store.database import migrate, open_engine
from chat_api.store.owners import OwnerStore

Check = Callable[[AsyncEngine, AsyncEngine], Awaitable[None]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/owners.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


def run(database_url: str, check: Check) -> None:
    """Run `check` with two engines on one database: two replicas of the gateway."""

    async def main() -> None:
        first, second = open_engine(database_url), open_engine(database_url)
        try:
            await migrate(first)
            await check(first, second)
        finally:
            await first.dispose()
            await second.dispose()

    asyncio.run(main())


def test_the_creator_is_found_and_nobody_else_is(database_url: str) -> None:
    async def check(engine: AsyncEngine, _: AsyncEngine) -> None:
        store = OwnerStore(engine)
        await store.record("resp_abc", "response", "key_1")
        await store.record("conv_abc", "conversation", None)
        owner = await store.owner_of("resp_abc")
        assert owner is not None
        assert (owner.object_id, owner.kind, owner.key_id) == ("resp_abc", "response", "key_1")
        assert owner.created_at.tzinfo is not None
        master = await store.owner_of("conv_abc")
        assert master is not None and master.key_id is None and master.kind == "conversation"
        assert await store.owner_of("resp_never_handed_out") is None

    run(database_url, check)


def test_the_first_record_of_an_id_stands(database_url: str) -> None:
    async def check(engine: AsyncEngine, _: AsyncEngine) -> None:
        store = OwnerStore(engine)
        await store.record("resp_1", "response", "key_1")
        again = await store.record("resp_1", "response", "key_2")
        assert again.key_id == "key_1"
        # and seen from a fresh cache too
        fresh = await OwnerStore(engine).owner_of("resp_1")
        assert fresh is not None and fresh.key_id == "key_1"

    run(database_url, check)


def test_racing_records_of_one_id_leave_one_owner(database_url: str) -> None:
    async def check(engine: AsyncEngine, other: AsyncEngine) -> None:
        one, two = OwnerStore(engine), OwnerStore(other)
        results = await asyncio.gather(
            *((one if i % 2 else two).record("resp_race", "response", f"key_{i}") for i in range(8))
        )
        assert len({owner.key_id for owner in results}) == 1
        final = await OwnerStore(engine).owner_of("resp_race")
        assert final is not None and final.key_id == results[0].key_id

    run(database_url, check)


def test_a_forgotten_object_has_no_owner_here_or_on_another_replica(database_url: str) -> None:
    async def check(engine: AsyncEngine, other: AsyncEngine) -> None:
        here, there = OwnerStore(engine), OwnerStore(other)
        await here.record("resp_gone", "response", "key_1")
        assert await here.owner_of("resp_gone") is not None  # now cached here
        assert await there.owner_of("resp_new_elsewhere") is None
        await there.record("resp_new_elsewhere", "response", "key_2")
        # An id unknown a moment ago is found once another replica recorded it.
        seen = await here.owner_of("resp_new_elsewhere")
        assert seen is not None and seen.key_id == "key_2"
        await here.forget("resp_gone")
        assert await here.owner_of("resp_gone") is None
        assert await there.owner_of("resp_gone") is None
        await here.forget("resp_gone")  # forgetting twice is fine

    run(database_url, check)


def test_owners_are_served_from_the_cache_and_the_cache_stays_small(database_url: str) -> None:
    async def check(engine: AsyncEngine, _: AsyncEngine) -> None:
        store = OwnerStore(engine, cache_size=2)
        for n in range(3):
            await store.record(f"resp_{n}", "response", f"key_{n}")
        await engine.dispose()
        queries: list[str] = []

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _count(*args: object) -> None:
            queries.append(str(args[2]))

        for n in (1, 2, 1, 2):
            owner = await store.owner_of(f"resp_{n}")
            assert owner is not None and owner.key_id == f"key_{n}"
        assert not [q for q in queries if "owners" in q]
        evicted = await store.owner_of("resp_0")  # pushed out of the cache, still on file
        assert evicted is not None and evicted.key_id == "key_0"
        assert [q for q in queries if "owners" in q]

    run(database_url, check)


def test_an_unknown_kind_is_refused(database_url: str) -> None:
    async def check(engine: AsyncEngine, _: AsyncEngine) -> None:
        with pytest.raises(ValueError, match="kind"):
            await OwnerStore(engine).record("file_1", "file", None)  # type: ignore[arg-type]

    run(database_url, check)


def test_a_conversations_images_added_on_one_replica_are_counted_on_the_other(
    database_url: str,
) -> None:
    """A response's count is fixed when it is stored; a conversation's grows, on any replica,
    and two calls counting at once each see the other's images, whichever counts first."""

    async def check(engine: AsyncEngine, other: AsyncEngine) -> None:
        one, two = OwnerStore(engine), OwnerStore(other)
        await one.record("resp_m", "response", "key_1", media=5)
        await one.record("conv_m", "conversation", "key_1", media=2)
        assert await two.owner_of("conv_m") is not None  # cached there from now on
        before = await asyncio.gather(one.count_into("conv_m", 3), two.count_into("conv_m", 4))
        assert sorted(before) in ([2, 5], [2, 6])  # the second to count saw the first
        assert await two.count_into("conv_m", 0) == 9  # read, not the cached 2
        await one.take_back("conv_m", 4)
        assert await one.count_into("conv_m", 0) == 5
        assert await one.count_into("conv_never_recorded", 3) == 0  # no row: none held
        response = await two.owner_of("resp_m")
        assert response is not None and response.media == 5

    run(database_url, check)


def test_a_count_that_cannot_be_written_refuses_before_and_is_logged_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Counted before a call is sent: a database that is away then is a 503, nothing sent.
    Taken back after a refusal: a database away then is logged, and the count stays high."""

    async def main() -> None:
        away = open_engine("postgresql://chat@127.0.0.1:9/none")  # nothing listens there
        store = OwnerStore(away, timeout=2)
        try:
            with pytest.raises(ServiceUnavailable):
                await store.count_into("conv_x", 3)
            await store.take_back("conv_x", 3)  # no exception
        finally:
            await away.dispose()

    asyncio.run(main())
    assert "could not take back a conversation's images" in caplog.text
