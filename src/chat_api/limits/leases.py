"""Call leases: no ledger row is lost when a replica dies (with Redis).

When a client key's call is admitted, it takes a lease in Redis, in the
same step as its budget reservation (`RedisBudgets.reserve`): a hash that
holds what its ledger row would say if nothing more were heard of it (the
worst case: its prompt bound, its output bound, their cost), and an entry
in the lease index, scored by when the lease runs out. The replica renews
the leases of its calls (`Holds`, with the calls in flight) until their
rows are committed:

    admitted ── lease: estimated row, reservation counted
       │ settle: the budget correction and the exact row, in one step
    settled ─── the ledger committed the row (`Ledger.on_written`)
       │
    gone: hash and index entry deleted

A replica that dies stops renewing. Any replica's reaper claims a lease
that ran out (atomically: one claimant), writes its row idempotently by
`call_id` (the exact row if the call had settled, else the estimate,
marked `estimated` with the outcome `replica_lost`) and deletes it. The
estimate is the worst case the budget reserved, so the budget counter
needs no correction for it: reserved and billed are the same amount. A row
the dead replica had committed stays as it was (`insert_once`), so every
call has exactly one row, whoever wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat_api import clock
from chat_api.calls import CallContext, Prepared
from chat_api.limits.epoch import Epoch, Seen
from chat_api.limits.in_flight import Holds
from chat_api.limits.shared_work import SharedWork
from chat_api.store.ledger import decode_row, encode_row

log = logging.getLogger("chat_api.limits")

LEASE_TTL = 7 * 86_400  # the hash outlives every replica stopping for a while
_LEASE_TTL = str(LEASE_TTL)
BUDGET_TTL = 60 * 60 * 24 * 40
REAPED_OUTCOME = "replica_lost"
LOST = (RedisConnectionError, RedisTimeoutError)  # a step lost on its way: it may be sent again
WRITTEN_TRIES = 5  # "rows written" lost with its connection or its answer: sent again


def again_in(attempt: int) -> float:
    """How long a lost step waits before it is sent again: 0.1, 0.2, 0.4... s."""
    return 0.1 * 2.0**attempt


WriteRows = Callable[[list[dict[str, Any]]], Awaitable[None]]
Seed = Callable[[], Awaitable[int]]

# Shared by RedisBudgets' reservation: KEYS[lease, index], ARGV[until, ttl, call id, fields...]
WRITE_LEASE = """
local function write_lease(lease, index, argv, from)
  redis.call('HSET', lease, unpack(argv, from + 3))
  redis.call('EXPIRE', lease, argv[from + 1])
  redis.call('ZADD', index, argv[from], argv[from + 2])
end
"""

_OPEN = (
    WRITE_LEASE
    + """
write_lease(KEYS[1], KEYS[2], ARGV, 1)
return 1
"""
)

# Shared with the settlement script of limits/shared_admission.py:
# -1 no such lease, 0 settled already, 1 settled, 2 settled and gone (its row was written)
SETTLE_LEASE = """
local function settle_lease(lease, index, budget, delta, row, call_id)
  if redis.call('EXISTS', lease) == 0 then return -1 end
  if redis.call('HGET', lease, 'settled') == '1' then return 0 end
  if delta ~= '0' and redis.call('EXISTS', budget) == 1 then
    redis.call('INCRBY', budget, delta)
  end
  if redis.call('HGET', lease, 'written') == '1' then
    redis.call('DEL', lease)
    redis.call('ZREM', index, call_id)
    return 2
  end
  redis.call('HSET', lease, 'settled', '1', 'row', row)
  return 1
end
"""

# KEYS[lease, index, budget], ARGV[delta, row, call id]
_SETTLE = (
    SETTLE_LEASE
    + """
return settle_lease(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"""
)

# Shared with the batch script of limits/shared_admission.py:
# keys[index, lease...], ids[call id...] -> per lease 1 deleted, 0 marked written (not
# settled yet), -1 no such lease (deleted before: its step ran twice, it was reaped, or
# Redis lost its data, which the replica looks into)
LEASES_WRITTEN = """
local function leases_written(keys, ids)
  local out = {}
  for i = 2, #keys do
    if redis.call('HGET', keys[i], 'settled') == '1' then
      redis.call('DEL', keys[i])
      redis.call('ZREM', keys[1], ids[i - 1])
      out[#out + 1] = 1
    elseif redis.call('EXISTS', keys[i]) == 1 then
      redis.call('HSET', keys[i], 'written', '1')
      out[#out + 1] = 0
    else
      out[#out + 1] = -1
    end
  end
  return out
end
"""

_WRITTEN = LEASES_WRITTEN + "return leases_written(KEYS, ARGV)\n"

# KEYS[index, lease], ARGV[now, claimed until, call id]
_CLAIM = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not s or tonumber(s) > tonumber(ARGV[1]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return redis.call('HGETALL', KEYS[2])
"""


@dataclass(slots=True)
class Lease:
    """One admitted call's lease, as this replica holds it."""

    call_id: str
    key_id: str
    fields: dict[str, str]
    bucket: str | None = None
    reserved: int = 0  # micro-dollars reserved against the budget
    budget_key: str = ""  # the Redis counter the reservation went to
    seed: Seed | None = None  # what the key spent by the ledger, to rebuild a lost counter
    settled: bool = False
    delta: int | None = None  # the budget correction, once the call settled
    row: str | None = None
    written: bool = False

    @classmethod
    def of(
        cls,
        call_id: str,
        key_id: str,
        ctx: CallContext,
        prepared: Prepared,
        now: float | None = None,
    ) -> Lease:
        """`now`: the clock as the caller read it for this admission (read here if None)."""
        fields = {
            "key_id": key_id,
            "at": repr(clock.now() if now is None else now),
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "model": prepared.model.name,
            "streamed": "1" if prepared.stream else "0",
            "prompt_bound": str(prepared.prompt_bound),
            "output_bound": str(prepared.output_bound),
            "worst_cost": str(prepared.worst_cost),
        }
        return cls(call_id, key_id, fields)

    def args(self, seconds: float, now: float | None = None) -> list[str]:
        """ARGV for `WRITE_LEASE`: until, ttl, call id, then the hash's fields.

        The estimate is one field (`estimate`, JSON): one argument to send
        instead of eighteen, on every call's admission.
        """
        estimate = orjson.dumps(self.fields).decode()
        until = (clock.now() if now is None else now) + seconds
        return [repr(until), _LEASE_TTL, self.call_id, "estimate", estimate]


def estimated_row(call_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The row of a call whose replica died before it settled: its worst case, marked."""
    return {
        "at": datetime.fromtimestamp(float(fields["at"]), UTC),
        "key_id": fields["key_id"] or None,  # "": the master key, or keys off
        "endpoint": fields["endpoint"],
        "model": fields["model"],
        "streamed": fields["streamed"] == "1",
        "outcome": REAPED_OUTCOME,
        "prompt_tokens": int(fields["prompt_bound"]),
        "completion_tokens": int(fields["output_bound"]),
        "estimated": True,
        "cost_usd": Decimal(fields["worst_cost"]),
        "latency_ms": 0.0,
        "ttft_ms": None,
        "request_id": fields["request_id"],
        "upstream_request_id": None,
        "call_id": call_id,
    }


class RedisLeases:
    """Leases for this replica's calls, and the reaper that settles dead replicas' ones."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        holds: Holds,
        write_rows: WriteRows,
        reap_every: float,
        epoch: Epoch,
        replicas: int = 1,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._holds = holds
        self._write_rows = write_rows
        self._reap_every = reap_every
        self.index = f"{prefix}leases"
        self._open = redis.register_script(_OPEN)
        self._settle = redis.register_script(_SETTLE)
        self._written = redis.register_script(_WRITTEN)
        self._claim = redis.register_script(_CLAIM)
        self.held: dict[str, Lease] = {}
        self.epoch = epoch
        self.replicas = replicas
        self._seen = Seen(epoch)
        holds.checks.append(self.check)
        self._reaper: asyncio.Task[None] | None = None
        self._checking = SharedWork()
        self.reaped = 0
        # Set by limits/shared_admission.py: "written" goes with the next batch it sends.
        self.batched: Callable[[list[str], list[str]], Awaitable[Any]] | None = None

    @property
    def seconds(self) -> float:
        return self._holds.seconds

    def key(self, call_id: str) -> str:
        return f"{self._prefix}lease:{call_id}"

    def taken(self, lease: Lease) -> None:
        """The lease is in Redis (written by `open` or with the reservation): keep it alive."""
        self.held[lease.call_id] = lease
        self._holds.keep(self.index, lease.call_id)

    def _gone(self, call_id: str) -> None:
        self.held.pop(call_id, None)
        self._holds.drop(self.index, call_id)

    async def open(self, lease: Lease) -> None:
        await self._open(keys=[self.key(lease.call_id), self.index], args=lease.args(self.seconds))
        self.taken(lease)

    def settling(self, lease: Lease, delta: int, row: dict[str, Any]) -> tuple[list[str], str]:
        """Mark the lease settled here: the keys (lease, index, budget) and row to send."""
        lease.delta, lease.row, lease.settled = delta, encode_row(row), True
        return [self.key(lease.call_id), self.index, lease.budget_key or self.index], lease.row

    async def settle(self, lease: Lease, delta: int, row: dict[str, Any]) -> None:
        """Apply the budget correction and keep the exact row, in one step."""
        keys, encoded = self.settling(lease, delta, row)
        done = int(await self._settle(keys=keys, args=[delta, encoded, lease.call_id]))
        await self.settled(lease, done)

    async def settled(self, lease: Lease, done: int) -> None:
        """After Redis settled a lease (`SETTLE_LEASE`'s answer)."""
        if done == -1 and await self._lost_data():
            return  # Redis lost it: put back, settled, with the rest (`recover`)
        self.settled_now(lease, done)

    async def _lost_data(self) -> bool:
        """Whether Redis lost its data since this replica last looked (then put its calls back).

        Through `check`, so a look at the same moment as another shares its one
        putting back, and no admission goes on before it is done.
        """
        before = self._seen.value
        await self.check()
        return before is not None and self._seen.value != before

    def settled_now(self, lease: Lease, done: int) -> None:
        """As `settled`, for an answer other than -1 when Redis did not lose its data."""
        if done in (2, -1):  # written already, or reaped after this replica stalled
            self._gone(lease.call_id)

    # --- after Redis lost its data ------------------------------------------------

    @property
    def epoch_seen(self) -> str:
        """The epoch this replica put its calls back in ("": not known yet)."""
        return self._seen.value or ""

    async def check(self) -> None:
        """Put this replica's calls back if Redis lost its data since the last look.

        Calls at the same moment share one look (and one putting back).
        """
        await self._checking.run("epoch", self._check)

    async def _check(self) -> None:
        if await self._seen.changed():
            await self.recover()

    async def before_seed(self, replicas: int) -> None:
        """A budget counter is missing: make sure it is rebuilt with every call in flight."""
        await self.check()
        if replicas > 1 and self._seen.value is not None:
            await self.epoch.settle_in(self._seen.value)

    async def recover(self) -> None:
        """Write back this replica's leases and add their reservations to rebuilt budgets."""
        log.warning(
            "Redis lost its data: putting back this replica's calls in flight",
            extra={"calls": len(self.held)},
        )
        await self._holds.restore()
        rebuilt: dict[str, bool] = {}  # budget counter -> rebuilt here, from committed rows
        for lease in list(self.held.values()):
            if lease.budget_key and lease.budget_key not in rebuilt and lease.seed is not None:
                if self.replicas > 1 and self._seen.value is not None:
                    # Not before the others had time to notice too: a counter rebuilt now
                    # would let calls in against it before their calls in flight are back.
                    await self.epoch.settle_in(self._seen.value)
                value = await lease.seed()
                rebuilt[lease.budget_key] = bool(
                    await self._redis.set(lease.budget_key, value, nx=True, ex=BUDGET_TTL)
                )
            if lease.settled and lease.written:
                self._gone(lease.call_id)  # its row is in the ledger
                if lease.budget_key and not rebuilt.get(lease.budget_key):
                    # Rebuilt elsewhere, maybe before the row landed: count it (errs high).
                    await self._redis.incrby(lease.budget_key, lease.reserved + (lease.delta or 0))
                continue
            await self._open(
                keys=[self.key(lease.call_id), self.index], args=lease.args(self.seconds)
            )
            state = ["settled", "1", "row", lease.row or ""] if lease.settled else []
            if lease.written:
                state += ["written", "1"]
            if state:
                await self._redis.hset(self.key(lease.call_id), items=state)
            if lease.budget_key:
                # Settled rows not committed yet count at their cost; open calls at their
                # reservation (and a committed row of an open call is in the rebuilt total).
                counted = lease.reserved + ((lease.delta or 0) if lease.settled else 0)
                await self._redis.incrby(lease.budget_key, counted)
        for lease in list(self.held.values()):  # committed while this ran: nothing to keep
            if lease.settled and lease.written:
                await self._redis.delete(self.key(lease.call_id))
                await self._redis.zrem(self.index, lease.call_id)
                self._gone(lease.call_id)

    def abandon(self, lease: Lease) -> None:
        """Stop renewing a lease that could not be settled: the reaper settles it."""
        self._gone(lease.call_id)

    async def written(self, call_ids: list[str]) -> None:
        """The ledger committed these calls' rows: their leases can go."""
        mine = [call_id for call_id in call_ids if call_id in self.held]
        if not mine:
            return
        keys = [self.index, *(self.key(call_id) for call_id in mine)]
        for attempt in range(WRITTEN_TRIES):  # safe to send twice; a moment later each time
            try:
                if self.batched is not None:
                    flags = await self.batched(keys, mine)
                else:
                    flags = await self._written(keys=keys, args=mine)
                break
            except (RedisError, OSError) as exc:
                if attempt + 1 == WRITTEN_TRIES or not isinstance(exc, LOST):
                    for call_id in mine:  # not renewed any more: the reaper deletes them
                        self._gone(call_id)
                    raise
                await asyncio.sleep(again_in(attempt))
        missing = []
        for call_id, flag in zip(mine, flags, strict=True):
            lease = self.held.get(call_id)
            if flag == 1:
                self._gone(call_id)
            elif lease is not None:
                lease.written = True
                if flag == -1:
                    missing.append(call_id)
        if missing:  # as a settlement that finds no lease: Redis may have lost its data
            try:
                await self.check()  # if it did, `recover` counted their rows, and let them go
            finally:
                for call_id in missing:
                    self._gone(call_id)

    # --- the reaper -------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), name="reaper")

    async def close(self) -> None:
        self._checking.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def _reap_loop(self) -> None:
        with contextlib.suppress(Exception):
            await self._seen.changed()  # the epoch this replica starts in
        while True:
            await asyncio.sleep(self._reap_every)
            try:
                await self.reap()
            except Exception as exc:
                log.warning("could not settle leases that ran out", extra={"error": repr(exc)})

    async def reap(self) -> int:
        """Turn every lease that ran out into its ledger row; how many were."""
        now = clock.now()
        expired = await self._redis.zrangebyscore(self.index, "-inf", now, start=0, num=200)
        count = 0
        for raw_id in expired:
            call_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if call_id in self.held:
                continue  # our own, renewed late (a stalled loop): not dead
            flat = await self._claim(
                keys=[self.index, self.key(call_id)],
                args=[now, clock.now() + self.seconds, call_id],
            )
            if not flat:
                continue
            fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
            if "estimate" in fields:  # leases written field by field (earlier versions) have none
                fields.update(orjson.loads(fields.pop("estimate")))
            row = decode_row(fields["row"]) if "row" in fields else estimated_row(call_id, fields)
            await self._write_rows([row])
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.key(call_id))
                pipe.zrem(self.index, call_id)
                await pipe.execute()
            count += 1
        if count:
            self.reaped += count
            log.warning(
                "settled the calls of a replica that stopped answering", extra={"calls": count}
            )
        return count


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
