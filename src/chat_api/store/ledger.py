"""The usage ledger: one row for every call that reached the upstream.

Rows are queued in memory by `add` (no I/O on the response path) and written
in batches by a background task. A failed write keeps its rows and tries
again; `close` writes whatever is left, so a normal stop loses nothing.
Reads give up after `read_timeout` seconds with a 503 (none for the CLI).
Writes are idempotent by `call_id` (a row already there is left as it is),
so a replica recovering a dead replica's call (`limits/leases.py`) and the
call's own row can never both land; `on_written` is told which calls'
rows were committed, so their leases can go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from itertools import islice
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from chat_api.calls import CallResult
from chat_api.store.database import answering
from chat_api.store.schema import usage

log = logging.getLogger("chat_api.ledger")

MAX_PENDING = 200_000  # rows held while the database is away (~60 MB)
DROPS_SAID_EVERY = 10.0  # seconds: a full backlog is one log line now and then, not one a call
STORED = Decimal("0.00000001")  # the ledger keeps dollars to 8 decimals


def dollars(amount: Decimal | float | int) -> float:
    """An amount of money as every answer and table shows it: exactly as the ledger keeps it.

    Nothing is rounded away, so the same spend reads the same everywhere (a
    sum the database returns as a float is brought back to the 8 decimals it
    was stored with). Anything finer, which no stored amount has, is rounded
    up: money errs on the operator's side.
    """
    exact = amount if isinstance(amount, Decimal) else Decimal(repr(amount))
    return float(exact.quantize(STORED, rounding=ROUND_CEILING))


def row_of(result: CallResult) -> dict[str, Any]:
    return {
        "at": datetime.fromtimestamp(result.at, UTC),
        "key_id": result.key_id,
        "endpoint": result.endpoint,
        "model": result.model,
        "streamed": result.streamed,
        "outcome": result.outcome,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "estimated": result.estimated,
        "cost_usd": result.cost,
        "latency_ms": round(result.latency * 1000, 3),
        "ttft_ms": round(result.first_token * 1000, 3) if result.first_token is not None else None,
        "request_id": result.request_id,
        "upstream_request_id": result.upstream_request_id,
        "call_id": result.call_id,
    }


def encode_row(row: dict[str, Any]) -> str:
    """A row as text, to keep beside its lease until the row is committed."""
    return orjson.dumps(
        {**row, "at": row["at"].timestamp(), "cost_usd": str(row["cost_usd"])}
    ).decode()


def decode_row(text: str | bytes) -> dict[str, Any]:
    row: dict[str, Any] = orjson.loads(text)
    row["at"] = datetime.fromtimestamp(row["at"], UTC)
    row["cost_usd"] = Decimal(row["cost_usd"])
    return row


async def insert_once(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Insert rows; one whose `call_id` is already there is left as it is."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(usage).on_conflict_do_nothing(index_elements=["call_id"])
    await connection.execute(statement, rows)


class Ledger:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        flush_interval: float,
        batch_size: int,
        read_timeout: float | None = None,
    ) -> None:
        self._engine = engine
        self._read_timeout = read_timeout
        self._interval = flush_interval
        self._batch = batch_size
        self._pending: deque[dict[str, Any]] = deque()
        self._queued = 0  # rows ever queued
        self._off = 0  # rows off the queue, written or dropped: the front row's number
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._writing: set[asyncio.Future[None]] = set()
        self._reading: dict[tuple[str, datetime | None], asyncio.Future[Decimal]] = {}
        self.written = 0
        self.dropped = 0
        self._drops_said: tuple[float, int] | None = None  # when, and how many had gone then
        self.on_written: Callable[[list[str]], None] = lambda call_ids: None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def add(self, row: dict[str, Any]) -> None:
        """Queue a call's row (`row_of`)."""
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._off += 1
            self.dropped += 1
            self._say_dropped()
        self._pending.append(row)
        self._queued += 1
        if len(self._pending) >= self._batch:
            self._wake.set()

    def _say_dropped(self, *, now_written: bool = False) -> None:
        """Log rows dropped: the first at once, then every `DROPS_SAID_EVERY` seconds at
        most, and what is left unsaid once the rows are written again."""
        now, said = time.monotonic(), self._drops_said
        if now_written:
            if said is None or said[1] == self.dropped:
                return
        elif said is not None and now - said[0] < DROPS_SAID_EVERY:
            return
        since = self.dropped - (said[1] if said is not None else 0)
        self._drops_said = (now, self.dropped)
        log.error(
            "ledger backlog full: dropped the oldest %d row(s) (%d in all)", since, self.dropped
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def _run(self) -> None:
        """Write a batch once `batch_size` rows wait, or every `flush_interval` seconds."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            deadline = loop.time() + self._interval
            while len(self._pending) < self._batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()  # set by rows that came while the last batch was written
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            try:
                await self.flush()
                failures = 0
                self._say_dropped(now_written=True)
            except Exception as exc:
                failures += 1
                log.warning(
                    "ledger write failed; rows kept for the next try",
                    extra={"backlog": self.backlog, "error": type(exc).__name__},
                )
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    async def flush(self) -> None:
        """Write every row queued so far, now.

        Rows queued while it writes wait for the next batch: chasing them
        wrote a few rows at a time, each batch a transaction and a trip to
        the database's thread, for as long as calls kept coming (measured
        with one client: six rows a batch, and a third of the gateway's CPU).
        Each batch is written by a shielded task that holds the lock until its
        rows are both committed and dropped from the queue: cancelling a
        flush (a client leaving, shutdown) can neither lose nor repeat rows.
        """
        upto = self._queued
        while self._pending and self._off < upto:
            write = asyncio.ensure_future(self._write_batch())
            self._writing.add(write)
            write.add_done_callback(self._writing.discard)
            await asyncio.shield(write)

    async def catch_up(self) -> None:
        """Write the queued rows before a read a client waits for, within the read timeout."""
        await answering(self._read_timeout, "Usage cannot be read", self.flush())

    async def _write_batch(self) -> None:
        async with self._lock:
            batch = list(islice(self._pending, self._batch * 5))
            if not batch:
                return
            async with self._engine.begin() as connection:
                await insert_once(connection, batch)
            # As many from the front as were written. Rows dropped meanwhile (the queue
            # full) came off the front, out of this batch, so this takes that many of the
            # oldest unwritten rows instead: the same rows a drop should have taken.
            for _ in batch:
                self._pending.popleft()
            self._off += len(batch)
            self.written += len(batch)
            self.on_written([row["call_id"] for row in batch if row["call_id"]])

    async def write_now(self, rows: list[dict[str, Any]]) -> None:
        """Write rows at once (recovered calls), idempotently."""
        async with self._engine.begin() as connection:
            await insert_once(connection, rows)

    async def close(self, give_up_after: float = 10.0) -> None:
        """Stop the writer and write what is left, trying for `give_up_after` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writing:  # a batch still being written: let it finish
            await asyncio.wait(set(self._writing), timeout=give_up_after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_after
        while self._pending:
            try:
                await self.flush()
            except Exception:
                if loop.time() > deadline:
                    log.error("ledger: %d rows could not be written at shutdown", self.backlog)
                    return
                await asyncio.sleep(0.2)

    # --- reading ----------------------------------------------------------------

    async def summary(
        self,
        *,
        key_id: str | None = None,
        all_keys: bool = False,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, Any]:
        """Totals, by model and by day (and by key when `all_keys`)."""
        conditions: list[ColumnElement[bool]] = []
        if not all_keys:
            conditions.append(
                usage.c.key_id.is_(None) if key_id is None else usage.c.key_id == key_id
            )
        if model:
            conditions.append(usage.c.model == model)
        if since:
            conditions.append(usage.c.at >= since)
        if until:
            conditions.append(usage.c.at < until)
        measures = (
            func.count().label("requests"),
            func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(usage.c.cost_usd), 0).label("cost_usd"),
        )
        day = func.date(usage.c.at).label("day")

        async def run() -> dict[str, Any]:
            async with self._engine.connect() as connection:
                totals = (await connection.execute(select(*measures).where(*conditions))).mappings()
                total_row = _numbers(totals.one())
                by_model = await connection.execute(
                    select(usage.c.model, *measures).where(*conditions).group_by(usage.c.model)
                )
                by_day = await connection.execute(
                    select(day, *measures).where(*conditions).group_by(day).order_by(day)
                )
                result: dict[str, Any] = {
                    "totals": total_row,
                    "by_model": [_numbers(row) for row in by_model.mappings()],
                    "by_day": [_numbers(row) for row in by_day.mappings()],
                }
                if all_keys:
                    by_key = await connection.execute(
                        select(usage.c.key_id, *measures)
                        .where(*conditions)
                        .group_by(usage.c.key_id)
                    )
                    result["by_key"] = [_numbers(row) for row in by_key.mappings()]
                return result

        return await answering(self._read_timeout, "Usage cannot be read", run())

    async def spent(self, key_id: str, since: datetime | None, *, queued: bool = True) -> Decimal:
        """What a key spent since `since` (ever, when None), by the rows written so far.

        `queued`: with the rows this process still holds (else committed rows only).
        Callers asking the same at the same moment (a burst's first calls, all
        seeding one budget) share one query, so a burst cannot drain the pool.
        """
        asked = (key_id, since)
        reading = self._reading.get(asked)
        if reading is None:
            reading = self._reading[asked] = asyncio.ensure_future(self._written(key_id, since))
            reading.add_done_callback(lambda done: self._reading.pop(asked, None))
        value = await asyncio.shield(reading)
        held = sum(
            (
                row["cost_usd"]
                for row in self._pending
                if queued and row["key_id"] == key_id and (since is None or row["at"] >= since)
            ),
            Decimal(0),
        )
        return value + held

    async def _written(self, key_id: str, since: datetime | None) -> Decimal:
        query = select(func.coalesce(func.sum(usage.c.cost_usd), 0)).where(usage.c.key_id == key_id)
        if since is not None:
            query = query.where(usage.c.at >= since)

        async def run() -> Decimal:
            async with self._engine.connect() as connection:
                return Decimal(str((await connection.execute(query)).scalar_one()))

        return await answering(self._read_timeout, "Budgets cannot be checked", run())


def _numbers(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(row).items():
        name = str(key)  # SQLAlchemy hands back str subclasses, which orjson refuses
        if name == "cost_usd" and value is not None:
            out[name] = dollars(value)
        elif isinstance(value, Decimal):
            out[name] = float(value)
        elif name == "day" and value is not None:
            out[name] = str(value)[:10]
        else:
            out[name] = value
    return out
