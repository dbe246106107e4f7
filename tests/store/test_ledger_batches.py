"""The ledger's writer: rows go in batches, however steadily calls keep coming."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event

from chat_api import clock
from chat_api.calls import CallResult
from chat_api.catalog import Catalog
from chat_api.config import Settings
from chat_api.store.database import migrate, open_engine
from chat_api.store.ledger import Ledger, row_of

ROWS = 600
BATCH = 100


def _result(catalog: Catalog, number: int) -> CallResult:
    return CallResult(
        at=clock.now(),
        request_id=f"req-{number}",
        key_id=None,
        endpoint="/v1/chat/completions",
        priced=catalog.resolve("gpt-4o-mini"),
        streamed=False,
        prompt_bound=10,
        outcome="ok",
        prompt_tokens=9,
        completion_tokens=20,
    )


def test_rows_that_come_while_a_batch_is_written_wait_for_the_next_batch(tmp_path: Path) -> None:
    """One call after another, a row each: a batch per `batch_size` rows, not a batch per few.

    The writer used to chase the rows queued while it wrote, in batches of
    the few that came meanwhile (six a batch with one client, a transaction
    and a trip to the database's thread each), for as long as calls came.
    """
    catalog = Catalog(Settings(_env_file=None))  # type: ignore[call-arg]
    statements: list[int] = []

    async def run() -> None:
        engine = open_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
        await migrate(engine)

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.startswith("INSERT INTO usage"):
                statements.append(len(params) if isinstance(params, list) else 1)

        ledger = Ledger(engine, flush_interval=60.0, batch_size=BATCH)
        ledger.start()
        for number in range(ROWS):
            ledger.add(row_of(_result(catalog, number)))
            await asyncio.sleep(0.0005)  # calls keep coming while batches are written
        await ledger.close()
        await engine.dispose()

    asyncio.run(run())

    with sqlite3.connect(tmp_path / "ledger.db") as db:
        written = [row[0] for row in db.execute("SELECT request_id FROM usage ORDER BY id")]
    assert written == [f"req-{number}" for number in range(ROWS)]  # each once, in order
    assert sum(statements) == ROWS
    # Every batch but the last (written at close) waited for a full batch.
    assert len(statements) <= ROWS // BATCH + 1, statements
    assert min(statements[:-1]) >= BATCH, statements
