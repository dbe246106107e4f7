"""Admission and settlement for replicas that share Redis: one round trip each.

Every request with a client key is checked against its key's requests and
tokens a minute, its calls in flight and its budget, and takes a lease
(limits/leases.py). Done one limit at a time, that is five round trips to
Redis before the call starts and three after; here it is one script
before (`admit`) and one after (`settle`):

- `_ADMIT` first checks that the key set did not change since the key was
  cached (store/keycache.py: a revoked key must be refused on every
  replica from the next request on), then every limit, in the order the
  step-by-step path uses; only when all of them fit does it take anything
  (the request and its worst-case tokens counted, a slot, the worst-case
  cost reserved, the lease written). A refusal takes nothing, so there is
  nothing to undo.
- `_SETTLE` gives the slot back, corrects the tokens counted, and settles
  the lease with the budget's correction and the exact ledger row. The
  calls that ended while one batch was on its way go together in the next
  (one pipelined round trip), off the response path.

The same Redis keys are used as by each limit's own class
(limits/counters.py, in_flight.py, budgets.py, leases.py), which keep their
bookkeeping on this replica (what it counted in each window, the holds it
renews) and their fallbacks: while Redis is away, `KeyMeter` goes the step
way, where rate limits count against this replica's share and budgets
answer 503.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from chat_api import clock
from chat_api.limits.budgets import RedisBudgets
from chat_api.limits.counters import RedisCounter
from chat_api.limits.in_flight import RedisInFlight
from chat_api.limits.leases import SETTLE_LEASE, WRITE_LEASE, Lease, RedisLeases

log = logging.getLogger("chat_api.limits")

ADMITTED = 1
KEY_SET_CHANGED = 0
RPM_FULL = 2
IN_FLIGHT_FULL = 3
TPM_FULL = 4
BUDGET_SHORT = 5
BUDGET_UNKNOWN = 6  # no running total in Redis yet: seed it from the ledger, then try again

# KEYS[version, rpm, in flight, tpm, budget, lease, lease index]
# ARGV[1 expected version or '', 2 rpm limit or '', 3 slot cap or '', 4 now, 5 hold until,
#      6 call id, 7 slot ttl, 8 tokens, 9 tpm limit or '', 10 cost, 11 budget limit or '',
#      12.. lease arguments]
# -> {outcome, requests counted, tokens counted, budget total before this call}
_ADMIT = (
    WRITE_LEASE
    + """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, 0, 0, 0} end
local rpm = 0
if ARGV[2] ~= '' then
  rpm = tonumber(redis.call('GET', KEYS[2]) or '0')
  if rpm + 1 > tonumber(ARGV[2]) then return {2, rpm, 0, 0} end
end
if ARGV[3] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then return {3, rpm, 0, 0} end
end
local tpm = 0
if ARGV[9] ~= '' then
  tpm = tonumber(redis.call('GET', KEYS[4]) or '0')
  if tpm >= tonumber(ARGV[9]) then return {4, rpm, tpm, 0} end
end
local spent = 0
if ARGV[11] ~= '' then
  local total = redis.call('GET', KEYS[5])
  if not total then return {6, rpm, tpm, 0} end
  spent = tonumber(total)
  if spent + tonumber(ARGV[10]) > tonumber(ARGV[11]) then return {5, rpm, tpm, spent} end
end
if ARGV[2] ~= '' then
  rpm = redis.call('INCR', KEYS[2])
  if rpm == 1 then redis.call('EXPIRE', KEYS[2], 120) end
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
if ARGV[9] ~= '' then
  tpm = redis.call('INCRBY', KEYS[4], ARGV[8])
  if tpm == tonumber(ARGV[8]) then redis.call('EXPIRE', KEYS[4], 120) end
end
if ARGV[11] ~= '' then redis.call('INCRBY', KEYS[5], ARGV[10]) end
write_lease(KEYS[6], KEYS[7], ARGV, 12)
return {1, rpm, tpm, spent}
"""
)

# KEYS[in flight, tpm, lease, lease index, budget]
# ARGV[call id, '1' to give the slot back, token correction, budget correction, row]
# -> the lease's settlement (SETTLE_LEASE)
_SETTLE = (
    SETTLE_LEASE
    + """
if ARGV[2] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], ARGV[3])
end
return settle_lease(KEYS[3], KEYS[4], KEYS[5], ARGV[4], ARGV[5], ARGV[1])
"""
)


# KEYS[in flight, tpm, budget, lease, lease index], ARGV[call id, tokens, cost]
# Undoes an admission nobody is left to use (the client left while it was on its way).
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECRBY', KEYS[2], ARGV[2]) end
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DECRBY', KEYS[3], ARGV[3])
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""


_Queued = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class Coalesced:
    """One script run for many calls: those that ask while a round trip is on its way go
    together in the next one, pipelined. With one call at a time it is a plain EVALSHA;
    with many, Redis and this process each do one read and one write per batch.
    """

    def __init__(self, redis: Redis, script: str) -> None:
        self._redis = redis
        self._text = script
        self._script = redis.register_script(script)
        self._queue: list[_Queued] = []
        self._busy = False
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, future))
        if not self._busy:
            self._busy = True
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    answers = await self._send(batch)
                except Exception as exc:
                    answers = [exc] * len(batch)
                except BaseException:  # cancelled (the loop is closing): nobody waits forever
                    for _, _, future in batch + self._queue:
                        future.cancel()
                    self._queue = []
                    raise
                for (_, _, future), answer in zip(batch, answers, strict=True):
                    if future.done():
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._busy = False

    async def _send(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        if len(batch) == 1:
            keys, args, _ = batch[0]
            return [await self._script(keys, args)]
        # EVALSHA by hand: redis-py's pipelined scripts ask SCRIPT EXISTS first, a round
        # trip more. A Redis that lost its scripts (restarted) gets it loaded, then again.
        answers: list[Any] = []
        for _ in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in batch:
                    pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                answers = await pipe.execute(raise_on_error=False)
            if not any(isinstance(answer, NoScriptError) for answer in answers):
                break
            await self._redis.script_load(self._text)
        return answers


@dataclass(frozen=True, slots=True)
class Ask:
    """What one call asks of its key's limits; None where the key has no such limit."""

    key_id: str
    call_id: str
    version: bytes | None  # the key set's version the key was cached under; None: checked
    rpm: int | None
    cap: int | None
    tokens: int
    tpm: int | None
    window: int
    budget_key: str | None
    cost: int
    budget_limit: int | None
    lease: Lease


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: int
    requests: int  # the key's requests this minute (with this one, if admitted)
    tokens: int  # its tokens this minute (likewise)
    spent: int  # its budget's running total before this call


@dataclass(frozen=True, slots=True)
class Settlement:
    keys: list[str]
    args: list[str | int]
    lease: Lease


class SharedAdmission:
    """The scripts, and the bookkeeping each limit's class keeps on this replica."""

    def __init__(
        self,
        redis: Redis,
        *,
        version_key: str,
        counter: RedisCounter,
        in_flight: RedisInFlight,
        budgets: RedisBudgets,
        leases: RedisLeases,
    ) -> None:
        self._admit = Coalesced(redis, _ADMIT)
        self._settle = Coalesced(redis, _SETTLE)
        self._release = Coalesced(redis, _RELEASE)
        self.version_key = version_key
        self.counter = counter
        self.in_flight = in_flight
        self.budgets = budgets
        self.leases = leases

    @property
    def ready(self) -> bool:
        """False while Redis is counted as away: the step-by-step path has the fallbacks."""
        return not self.counter.degraded

    async def admit(self, ask: Ask) -> Answer:
        """Run `_ADMIT`; on success, the bookkeeping of what it took. Redis errors propagate.

        Once sent, the script runs whatever happens here: if the client
        leaves meanwhile, what it took is given back as soon as it answers.
        """
        now = clock.now()
        hold = self.in_flight.hold_seconds
        lease = ask.lease
        keys = [
            self.version_key,
            self.counter.key(f"rpm:{ask.key_id}", ask.window),
            self.in_flight.key(ask.key_id),
            self.counter.key(f"tpm:{ask.key_id}", ask.window),
            ask.budget_key or self.version_key,
            self.leases.key(ask.call_id),
            self.leases.index,
        ]
        args: list[str | int | float] = [
            ask.version.decode() if ask.version is not None else "",
            _limit(ask.rpm),
            _limit(ask.cap),
            now,
            now + hold,
            ask.call_id,
            int(hold * 2) + 1,
            ask.tokens,
            _limit(ask.tpm),
            ask.cost,
            _limit(ask.budget_limit),
            *lease.args(self.leases.seconds),
        ]
        sent = self._admit.submit(keys, args)
        try:
            raw = await asyncio.shield(sent)
        except asyncio.CancelledError:
            sent.add_done_callback(lambda done: self._unused(done, ask, keys))
            raise
        outcome, requests, tokens, spent = (int(v) for v in raw)
        if outcome == ADMITTED:
            if ask.cap is not None:
                self.in_flight.held(ask.key_id, ask.call_id)
            self.leases.taken(lease)
            requests += await self._counted("rpm", ask, 1, requests, ask.rpm)
            tokens += await self._counted("tpm", ask, ask.tokens, tokens, ask.tpm)
        return Answer(outcome, requests, tokens, spent)

    def _unused(self, sent: asyncio.Future[Any], ask: Ask, keys: list[str]) -> None:
        """The client left while `_ADMIT` was on its way: give back what it took, if it did."""
        if sent.cancelled() or sent.exception() is not None or int(sent.result()[0]) != ADMITTED:
            return
        tokens = ask.tokens if ask.tpm is not None else 0
        undo = [keys[2], keys[3], keys[4], keys[5], keys[6]]
        released = self._release.submit(undo, [ask.call_id, tokens, ask.cost])
        released.add_done_callback(_quiet)

    async def _counted(self, kind: str, ask: Ask, amount: int, used: int, limit: int | None) -> int:
        if limit is None:
            return 0
        return await self.counter.counted(f"{kind}:{ask.key_id}", ask.window, amount, used)

    def settling(
        self,
        *,
        key_id: str,
        call_id: str,
        slot: bool,
        window: int | None,
        token_delta: int,
        budget_delta: int,
        lease: Lease,
        row: dict[str, object],
    ) -> Settlement:
        """A call's corrections, noted on this replica, ready for `settle`."""
        holds_slot = slot and self.in_flight.released(key_id, call_id)
        tpm_key = self.version_key
        if window is not None:
            tpm_key = self.counter.key(f"tpm:{key_id}", window)
            self.counter.corrected(f"tpm:{key_id}", window, token_delta)
        else:
            token_delta = 0
        lease_keys, encoded = self.leases.settling(lease, budget_delta, dict(row))
        keys = [self.in_flight.key(key_id), tpm_key, *lease_keys]
        args = [call_id, "1" if holds_slot else "0", token_delta, budget_delta, encoded]
        return Settlement(keys, args, lease)

    async def settle(self, settlement: Settlement) -> None:
        """Run `_SETTLE` (with the other calls that ended meanwhile, in one round trip).

        A call whose settlement failed has its lease given up to the reaper,
        which settles it at its reservation (errs on the operator's side).
        """
        lease = settlement.lease
        try:
            done = int(await self._settle.submit(settlement.keys, settlement.args))
            await self.leases.settled(lease, done)
        except (RedisError, OSError) as exc:
            self.leases.abandon(lease)
            log.warning("could not correct limits after a call", extra={"error": repr(exc)})


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning(
            "could not give back an unused admission", extra={"error": repr(future.exception())}
        )


def _limit(value: int | None) -> str | int:
    return "" if value is None else value
