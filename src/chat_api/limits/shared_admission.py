"""Admission and settlement for replicas that share Redis: one script step each.

Every request with a client key is checked against its key's requests and
tokens a minute, its calls in flight and its budget, and takes a lease
(limits/leases.py). Done one limit at a time, that is five round trips to
Redis before the call starts and three after; here it is one step of a
script before (`admit`) and one after (`settle`):

- `_ADMIT` first checks that the key set did not change since the key was
  cached (store/keycache.py: a revoked key must be refused on every
  replica from the next request on), then every limit, in the order the
  step-by-step path uses; only when all of them fit does it take anything
  (the request and its worst-case tokens counted, a slot, the worst-case
  cost reserved, the lease written). A refusal takes nothing, so there is
  nothing to undo.
- `_SETTLE` gives the slot back, corrects the tokens counted, and settles
  the lease with the budget's correction and the exact ledger row, off the
  response path.

Steps do not each cost a round trip: the steps this replica asks for
while a script run is on its way go in the next run, as one `EVALSHA`
with one JSON argument (`Batched`). An admission goes at once (a call
waits for it); what comes after a call (settlements, the ledger's "rows
written") waits up to `AFTER_WAITS` (1 ms) for one to go with. Each step
is atomic, as the whole run is, and a step that fails fails alone.

The same Redis keys are used as by each limit's own class
(limits/counters.py, in_flight.py, budgets.py, leases.py), which keep their
bookkeeping on this replica (what it counted in each window, the holds it
renews) and their fallbacks: while Redis is away, `KeyMeter` goes the step
way, where rate limits count against this replica's share and budgets
answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat_api.limits.budgets import RedisBudgets
from chat_api.limits.counters import RedisCounter
from chat_api.limits.in_flight import RedisInFlight
from chat_api.limits.leases import (
    LEASES_WRITTEN,
    LOST,
    SETTLE_LEASE,
    WRITE_LEASE,
    Lease,
    RedisLeases,
    again_in,
)
from chat_api.store.shared import Reachability

log = logging.getLogger("chat_api.limits")

ADMITTED = 1
KEY_SET_CHANGED = 0
RPM_FULL = 2
IN_FLIGHT_FULL = 3
TPM_FULL = 4
BUDGET_SHORT = 5
BUDGET_UNKNOWN = 6  # no running total in Redis yet: seed it from the ledger, then try again
EPOCH_CHANGED = 7  # Redis lost its data since this replica last looked: put its calls back first

# K[version, rpm, in flight, tpm, budget, lease, lease index, epoch]
# A[1 expected version or '', 2 rpm limit or '', 3 slot cap or '', 4 now, 5 hold until,
#   6 call id, 7 slot ttl, 8 tokens, 9 tpm limit or '', 10 cost, 11 budget limit or '',
#   12 the epoch this replica knows or '', 13.. lease arguments]
# -> {outcome, requests counted, tokens counted, budget total before this call}
_ADMIT = """
local function admit(K, A)
  if A[12] ~= '' and redis.call('GET', K[8]) ~= A[12] then return {7, 0, 0, '0'} end
  if redis.call('EXISTS', K[6]) == 1 then  -- its lease is there: admitted by a run sent twice
    local requests = tonumber(redis.call('GET', K[2]) or '0')
    return {1, requests, tonumber(redis.call('GET', K[4]) or '0'), '0'}
  end
  if A[1] ~= '' and redis.call('GET', K[1]) ~= A[1] then return {0, 0, 0, 0} end
  local rpm = 0
  if A[2] ~= '' then
    rpm = tonumber(redis.call('GET', K[2]) or '0')
    if rpm + 1 > tonumber(A[2]) then return {2, rpm, 0, 0} end
  end
  if A[3] ~= '' and redis.call('ZCARD', K[3]) >= tonumber(A[3]) then
    redis.call('ZREMRANGEBYSCORE', K[3], '-inf', A[4])  -- at the cap: the expired ones go
    if redis.call('ZCARD', K[3]) >= tonumber(A[3]) then return {3, rpm, 0, 0} end
  end
  local tpm = 0
  if A[9] ~= '' then
    tpm = tonumber(redis.call('GET', K[4]) or '0')
    if tpm >= tonumber(A[9]) then return {4, rpm, tpm, 0} end
  end
  local spent = '0'  -- as Redis keeps it: JSON would round a number past 14 digits
  if A[11] ~= '' then
    spent = redis.call('GET', K[5])
    if not spent then return {6, rpm, tpm, '0'} end
    if tonumber(spent) + tonumber(A[10]) > tonumber(A[11]) then return {5, rpm, tpm, spent} end
  end
  if A[2] ~= '' then
    rpm = redis.call('INCR', K[2])
    if rpm == 1 then redis.call('EXPIRE', K[2], 120) end
  end
  if A[3] ~= '' then
    redis.call('ZADD', K[3], A[5], A[6])
    redis.call('EXPIRE', K[3], A[7])
  end
  if A[9] ~= '' then
    tpm = redis.call('INCRBY', K[4], A[8])
    if tpm == tonumber(A[8]) then redis.call('EXPIRE', K[4], 120) end
  end
  if A[11] ~= '' then redis.call('INCRBY', K[5], A[10]) end
  write_lease(K[6], K[7], A, 13)
  return {1, rpm, tpm, spent}
end
"""

# K[in flight, tpm, lease, lease index, budget]
# A[call id, '1' to give the slot back, token correction, budget correction, row]
# -> the lease's settlement (SETTLE_LEASE); 0 (settled already): nothing done twice
_SETTLE = """
local function settle(K, A)
  if A[2] == '1' then redis.call('ZREM', K[1], A[1]) end
  local done = settle_lease(K[3], K[4], K[5], A[4], A[5], A[1])
  if done > 0 and A[3] ~= '0' and redis.call('EXISTS', K[2]) == 1 then
    redis.call('INCRBY', K[2], A[3])  -- once: a lease settled already (or gone) was then
  end
  return done
end
"""

# K[in flight, tpm, budget, lease, lease index], A[call id, tokens, cost]
# Undoes an admission nobody is left to use: the client left while it was on its way, or
# its answer was lost. Only if the admission ran and was not undone yet (its lease is
# there and unsettled): 1 undone, 0 nothing to undo.
_RELEASE = """
local function release(K, A)
  if redis.call('EXISTS', K[4]) == 0 or redis.call('HGET', K[4], 'settled') == '1' then
    return 0
  end
  redis.call('DEL', K[4])
  redis.call('ZREM', K[5], A[1])
  redis.call('ZREM', K[1], A[1])
  if redis.call('EXISTS', K[2]) == 1 then redis.call('DECRBY', K[2], A[2]) end
  if A[3] ~= '0' and redis.call('EXISTS', K[3]) == 1 then
    redis.call('DECRBY', K[3], A[3])
  end
  return 1
end
"""

# ARGV[1]: a JSON list of [operation, keys, arguments] (all strings) -> a JSON list of
# their answers, in order; one that failed is {"err": why}, and the others still ran.
_BATCH = (
    WRITE_LEASE
    + SETTLE_LEASE
    + LEASES_WRITTEN
    + _ADMIT
    + _SETTLE
    + _RELEASE
    + """
local run = {admit = admit, settle = settle, release = release, written = leases_written}
local out = {}
for i, op in ipairs(cjson.decode(ARGV[1])) do
  local ok, answer = pcall(run[op[1]], op[2], op[3])
  if not ok then
    answer = {err = type(answer) == 'table' and answer.err or tostring(answer)}
  end
  out[i] = answer
end
return cjson.encode(out)
"""
)

# A run that failed this way may have run in Redis: what it took is undone if it did.
_LOST = (*LOST, OSError)
AFTER_WAITS = 0.001  # what comes after a call waits this long for an admission to go with
# A settlement, or the giving back of an admission that may have run unused, lost with its
# connection or its answer is sent this many times at most, `again_in` apart (3.1 s of
# waiting in all, well within a lease's life; a stop waits at most `KeyMeter.stop`'s limit).
RELEASE_TRIES = 6


def _may_have_run() -> RedisConnectionError:
    """What a step to be sent again after a lost run gets if it cannot be: it may have run."""
    return RedisConnectionError("Redis is away: a lost run of this step may have run")


Op = Literal["admit", "settle", "release", "written"]
Orphaned = Callable[[Any], None]
_Queued = tuple[Op, list[str], list[str], "asyncio.Future[Any]", Orphaned | None]


class _Line(asyncio.Protocol):
    """A connection of the batch's own, one run at a time on it, read as its answer arrives.

    redis-py makes the connection with the client's settings (address,
    password, database, TLS, protocol version); then this protocol takes
    its transport over. A run's answer is parsed in the loop's own callback
    for the socket (`data_received`) and wakes its callers directly, with
    no task waiting on the socket in between (measured on one client:
    about 35 µs less a run than redis-py's read path behind a task).
    """

    def __init__(self, answered: Callable[[_Line, Any], None]) -> None:
        self.conn: AbstractConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.batch: list[_Queued] | None = None  # the run on its way
        self.kinds = (False, False)  # its `_kinds`
        self.answered = 0  # runs answered on this connection
        self.timer: asyncio.TimerHandle | None = None
        self._buffer = bytearray()
        self._answered = answered

    def take_over(self, conn: AbstractConnection) -> None:
        writer = conn._writer  # the transport redis-py connected; read here from now on
        assert writer is not None
        self.conn, self.transport = conn, cast(asyncio.Transport, writer.transport)
        self.transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, command: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(command)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            reply = _reply(self._buffer)
        except ValueError:  # not an answer to a script run
            reply = (None, len(self._buffer))
        if reply is None:
            return  # the rest is on its way
        answer, used = reply
        del self._buffer[:used]
        if answer is None or self.batch is None or self._buffer:  # or nothing, or more, asked
            self.close()
            answer = RedisConnectionError("Redis answered out of step")
        self._finish(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self._finish(RedisConnectionError("Redis closed the connection"))

    def _finish(self, answer: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.batch is not None:
            self._answered(self, answer)

    def close(self) -> None:
        conn, self.conn, self.transport = self.conn, None, None
        if conn is not None:
            conn._close()  # type: ignore[no-untyped-call]  # the transport, and redis-py's note of it


def _kinds(batch: list[_Queued]) -> tuple[bool, bool]:
    """Whether a batch carries admissions, and whether it carries steps after calls."""
    admits = [q[0] == "admit" for q in batch]
    return any(admits), not all(admits)


def _reply(buffer: bytearray) -> tuple[Any, int] | None:
    """The first reply in `buffer` and its length, None while incomplete.

    A script run answers a bulk string (the batch's JSON) or an error.
    """
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    kind, head = buffer[:1], buffer[1:end].decode()
    if kind == b"-":
        error = NoScriptError if head.startswith("NOSCRIPT") else ResponseError
        return error(head), end + 2
    if kind != b"$":
        raise ValueError(f"not an answer to a script run: {kind!r}")
    size = int(head)
    if size < 0:
        raise ValueError("no answer (a null bulk string)")
    stop = end + 2 + size
    if len(buffer) < stop + 2:
        return None
    return bytes(buffer[end + 2 : stop]), stop + 2


class Batched:
    """One script run for every call that asks while a run is on its way.

    Admissions, settlements and the ledger's "rows written" of every call
    on this replica share one queue: whatever was asked while the last run
    was on its way goes as one `EVALSHA` with one argument (a JSON list),
    and comes back as one string; Redis and this process each parse one
    command and one answer per batch, not one per call and step. An
    admission starts a run at once; the steps after a call wait up to
    `AFTER_WAITS` for an admission to ride with, so calls one after the
    other cost one run each, not two (measured: 2.08 runs a call → 1.09).

    An admission never waits behind a run that carries none: while one
    with only what comes after calls is on its way, the admissions go at
    once in a second run, over a second connection. So at most two runs
    are on their way, one of them with admissions; the steps after calls
    stay in the order they were asked (one run of them at a time).

    A run is written to its connection (`_Line`) as soon as it is asked,
    and its answer is handed out as it arrives; the next batch goes on the
    same connection at once. One timer covers the whole exchange. A
    connection that went stale (closed by Redis or a proxy) is noticed by
    the loop and replaced before the next run. A run is never sent twice:
    once it is on its way, a failure is its callers' (it may have run),
    and an admission lost that way is undone if it did run.
    """

    def __init__(self, redis: Redis, reach: Reachability | None = None) -> None:
        self._redis = redis
        self._reach = reach if reach is not None else Reachability(redis)
        self._sha = redis.register_script(_BATCH).sha
        # `EVALSHA <sha> 0` as Redis reads a command (RESP), before the one argument.
        self._evalsha = b"*4\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n" % self._sha.encode()
        self._queue: list[_Queued] = []
        self._runs = 0  # connections busy (connecting, or a run on its way): at most two
        self._sent_admits = 0  # runs on their way with admissions
        self._sent_after = 0  # runs on their way with steps after calls: at most one
        self._tasks: set[asyncio.Task[None]] = set()  # connecting, or loading the script
        self._no_runs = asyncio.Event()
        self._no_runs.set()
        pool = redis.connection_pool
        self._timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._lines: list[_Line] = []  # the idle ones
        self._busy: set[_Line] = set()
        self._resent: set[asyncio.Future[Any]] = set()  # steps sent again (`_again`): once only
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def submit(
        self,
        op: Op,
        keys: list[str],
        args: list[str],
        orphaned: Orphaned | None = None,
        *,
        idle: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue one step; its answer comes on the future. `orphaned` gets the answer of
        a step whose future was cancelled meanwhile (its caller left): it ran anyway.

        `idle`: no other call is open on this replica, so no admission is coming
        to ride with; the step goes at once (a call settles once its answer is
        written, engine.py), instead of in the next admission's run, where its
        time in Redis would be that admission's wait.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((op, keys, args, future, orphaned))
        if op == "admit":
            self._kick(admit=True)
        elif idle:
            self._kick()
        else:
            self._soon()
        return future

    def _kick(self, *, admit: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The one run on its way carries only steps after calls (else this admission
        # goes with the next batch on that connection, as it does between two runs).
        behind_after = self._runs == 1 and self._sent_after == 1 and not self._sent_admits
        if self._queue and (not self._runs or (admit and behind_after)):
            self._runs += 1
            self._no_runs.clear()
            while self._lines and not self._lines[-1].usable:  # closed while idle
                self._lines.pop().close()
            if self._lines:
                self._next(self._lines.pop())
            else:
                self._background(self._connect(_Line(self._answered)))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Queued]:
        """The next batch: every admission asked; the steps after calls unless another
        run of them is on its way (it takes them once it is back)."""
        if not self._sent_after:
            batch, self._queue = self._queue, []
        else:
            batch = [q for q in self._queue if q[0] == "admit"]
            self._queue = [q for q in self._queue if q[0] != "admit"]
        # An admission whose caller left before it was sent: nothing taken yet, unless
        # it is to be sent again (`_again`): its lost run may have taken it, so undone.
        left = [q for q in batch if q[0] == "admit" and q[3].cancelled()]
        if left:
            self._deliver([q for q in left if q[3] in self._resent], _may_have_run())
            batch = [q for q in batch if not (q[0] == "admit" and q[3].cancelled())]
        if self._reach.away:
            # Admissions queued behind a run that was lost are not sent to wait out
            # a timeout too: their calls fall back at once (never sent: nothing to
            # undo, so not a `_LOST` error, unless a lost run of theirs may have run).
            # What comes after a call (settling, undoing) is still sent, off the path.
            for q in batch:
                if q[0] == "admit" and not q[3].done():
                    resent = q[3] in self._resent
                    self._resent.discard(q[3])
                    error = _may_have_run() if resent else RedisError("Redis is away: not sent")
                    q[3].set_exception(error)
            batch = [q for q in batch if q[0] != "admit"]
        return batch

    def _next(self, line: _Line) -> None:
        """Send the next batch on `line`; with nothing to send, the line is idle again."""
        batch = self._take() if not self._closed else []
        if not batch or not line.usable:
            self._done_with(line)
            if batch:  # the line was lost meanwhile: a fresh one takes them
                self._queue[:0] = batch
                self._kick(admit=_kinds(batch)[0])
            else:
                self._soon()  # a step asked while taking (a release), which no run will take
            return
        self._send(line, batch)

    def _soon(self) -> None:
        """With steps queued and no run on its way to take them: one goes in `AFTER_WAITS`."""
        if self._queue and not self._runs and self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(AFTER_WAITS, self._kick)

    def _send(self, line: _Line, batch: list[_Queued]) -> None:
        payload = orjson.dumps([[op, keys, args] for op, keys, args, *_ in batch])
        line.batch = batch
        self._busy.add(line)
        admits, after = line.kinds = _kinds(batch)
        self._sent_admits += admits
        self._sent_after += after
        if self._timeout is not None:
            loop = asyncio.get_running_loop()
            line.timer = loop.call_later(self._timeout, self._timed_out, line)
        self._write(line, [self._evalsha, b"$%d\r\n" % len(payload), payload, b"\r\n"])

    def _write(self, line: _Line, command: list[bytes]) -> None:
        line.write(command)

    def _timed_out(self, line: _Line) -> None:
        line.timer = None
        line.close()
        self._answered(line, RedisTimeoutError("Redis did not answer a script run in time"))

    def _answered(self, line: _Line, answer: Any) -> None:
        batch, line.batch = line.batch, None
        assert batch is not None
        self._busy.discard(line)
        admits, after = line.kinds
        self._sent_admits -= admits
        self._sent_after -= after
        if isinstance(answer, NoScriptError):  # a Redis that lost its scripts: load it again
            self._background(self._reload(line, batch))
            return
        if isinstance(answer, (RedisConnectionError, RedisTimeoutError)):
            line.close()  # what is left on it is unknown
            if (
                isinstance(answer, RedisConnectionError)
                and line.answered
                and not self._closed
                and self._again(line, batch, answer)
            ):
                return
            self._reach.went_down()
        else:
            line.answered += 1
        self._deliver(batch, answer)
        self._next(line)

    def _again(self, line: _Line, batch: list[_Queued], lost: Exception) -> bool:
        """Send a run lost with a connection that had answered before, once more, on a new one.

        The connection went stale (Redis restarted, a proxy forgot it): every
        step is safe to run twice (an admission whose lease is there answers
        "admitted", the others look before they act), so its callers are
        answered, not refused. The idle connections are as old: they go too.
        A run lost on a connection's first run, or a step lost a second time,
        is its callers' (False: Redis is away).
        """
        if any(q[3] in self._resent for q in batch):
            return False
        for idle in self._lines:
            idle.close()
        self._lines = []
        # An admission whose caller left is not sent again: undone if the lost run took it.
        left = [q for q in batch if q[0] == "admit" and q[3].cancelled()]
        self._deliver(left, lost)
        again = [q for q in batch if not (q[0] == "admit" and q[3].cancelled())]
        self._resent.update(q[3] for q in again)
        self._queue[:0] = again
        self._done_with(line)
        self._kick(admit=True)
        return True

    def _deliver(self, batch: list[_Queued], raw: Any) -> None:
        answers: list[Any]
        if isinstance(raw, Exception):
            answers = [raw] * len(batch)
        else:
            try:
                answers = orjson.loads(raw)
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise ResponseError("the batch script answered out of step")
            except (orjson.JSONDecodeError, ResponseError) as exc:
                answers = [ResponseError(str(exc))] * len(batch)
        for (*_, future, orphaned), answer in zip(batch, answers, strict=True):
            self._resent.discard(future)
            if isinstance(answer, dict):
                answer = ResponseError(answer.get("err", "script error"))
            if not future.done():
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
            elif future.cancelled() and orphaned is not None:
                try:
                    orphaned(answer)
                except Exception as exc:  # a callback's failure must not stall the rest
                    log.warning("could not undo a step", extra={"error": repr(exc)})

    def _done_with(self, line: _Line) -> None:
        self._runs -= 1
        if line.usable and not self._closed:
            self._lines.append(line)
        else:
            line.close()
        if not self._runs:
            self._no_runs.set()

    async def _connect(self, line: _Line) -> None:
        pool = self._redis.connection_pool
        conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
            line.take_over(conn)
        except (RedisError, OSError, TimeoutError) as exc:
            self._reach.went_down()
            error: RedisError = (
                exc
                if isinstance(exc, RedisError)
                else RedisTimeoutError("Redis did not answer in time")
                if isinstance(exc, TimeoutError)
                else RedisConnectionError(repr(exc))
            )
            self._deliver(self._take(), error)  # never sent: nothing ran
            self._done_with(line)
            self._soon()  # what the callers asked meanwhile (the undoing of a lost run)
            return
        except BaseException:  # cancelled (the loop is closing): nobody waits forever
            for *_, future, _ in self._queue:
                future.cancel()
            self._queue = []
            self._done_with(line)
            raise
        self._next(line)

    async def _reload(self, line: _Line, batch: list[_Queued]) -> None:
        try:
            await self._redis.script_load(_BATCH)
        except (RedisError, OSError) as exc:
            self._deliver(batch, exc)  # not run: NOSCRIPT ran nothing
            self._next(line)
            return
        if line.usable and not self._closed:
            self._send(line, batch)
        else:
            self._deliver(batch, RedisConnectionError("closing"))
            self._next(line)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """At shutdown, after the last steps were answered (`SharedAdmission.drain`)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._runs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_runs.wait(), self._timeout)
        for line in [*self._lines, *self._busy]:
            line.close()
        self._lines = []


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
    now: float  # the clock reading `window` and the lease come from
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
    args: list[str]
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
        self._batch = Batched(redis, counter.reach)
        self._settling: set[asyncio.Future[Any]] = set()
        self._open = 0  # calls admitted here and not settled yet
        leases.batched = lambda keys, ids: self._batch.submit("written", keys, ids)
        self.version_key = version_key
        self._names_of: dict[str, tuple[str, str, str]] = {}
        self._names_window = 0
        self.counter = counter
        self.in_flight = in_flight
        self.budgets = budgets
        self.leases = leases

    def _names(self, key_id: str, window: int) -> tuple[str, str, str]:
        """A key's counters in Redis for a minute: requests, calls in flight, tokens.

        Worked out once a minute per key, not once a call; the last minute's go.
        """
        if window != self._names_window:
            self._names_of, self._names_window = {}, window
        names = self._names_of.get(key_id)
        if names is None:
            names = self._names_of[key_id] = (
                self.counter.key(f"rpm:{key_id}", window),
                self.in_flight.key(key_id),
                self.counter.key(f"tpm:{key_id}", window),
            )
        return names

    @property
    def ready(self) -> bool:
        """False while Redis is counted as away: the step-by-step path has the fallbacks."""
        return not self.counter.degraded

    async def admit(self, ask: Ask) -> Answer:
        """Run `_ADMIT`; on success, the bookkeeping of what it took. Redis errors propagate.

        Once sent, the script runs whatever happens here: if the client
        leaves meanwhile, what it took is given back as soon as it answers.
        """
        now = ask.now
        hold = self.in_flight.hold_seconds
        lease = ask.lease
        rpm_key, in_flight_key, tpm_key = self._names(ask.key_id, ask.window)
        keys = [
            self.version_key,
            rpm_key,
            in_flight_key,
            tpm_key,
            ask.budget_key or self.version_key,
            self.leases.key(ask.call_id),
            self.leases.index,
            self.leases.epoch.key,
        ]
        args = [  # strings, as Redis would have received them: the scripts compare strings
            ask.version.decode() if ask.version is not None else "",
            _limit(ask.rpm),
            _limit(ask.cap),
            repr(now),
            repr(now + hold),
            ask.call_id,
            str(int(hold * 2) + 1),
            str(ask.tokens),
            _limit(ask.tpm),
            str(ask.cost),
            _limit(ask.budget_limit),
            self.leases.epoch_seen,
            *lease.args(self.leases.seconds, now),
        ]
        unused = functools.partial(self._unused, ask, keys)
        sent = self._batch.submit("admit", keys, args, unused)
        try:
            raw = await sent
        except asyncio.CancelledError:
            if sent.done() and not sent.cancelled():  # answered as the client left
                error = sent.exception()
                unused(error if error is not None else sent.result())
            raise  # else the batch hands `unused` the answer when it comes
        except _LOST:
            # Lost on its way back: it may have run. Undone if it did (a release of an
            # admission that never ran does nothing); the caller falls back meanwhile.
            self._release(ask, keys)
            raise
        outcome, requests, tokens, spent = map(int, raw)
        if outcome == ADMITTED:
            self._open += 1
            if ask.cap is not None:
                self.in_flight.held(ask.key_id, ask.call_id)
            self.leases.taken(lease)
            if ask.rpm is not None:
                requests += await self.counter.counted(f"rpm:{ask.key_id}", ask.window, 1, requests)
            if ask.tpm is not None:
                tokens += await self.counter.counted(
                    f"tpm:{ask.key_id}", ask.window, ask.tokens, tokens
                )
        return Answer(outcome, requests, tokens, spent)

    def _unused(self, ask: Ask, keys: list[str], answer: Any) -> None:
        """The client left while `_ADMIT` was on its way: give back what it took, if it did."""
        if isinstance(answer, _LOST) or (
            not isinstance(answer, Exception) and int(answer[0]) == ADMITTED
        ):
            self._release(ask, keys)

    def _release(self, ask: Ask, keys: list[str], attempt: int = 0) -> None:
        if self._batch.closed:
            return  # stopping: left to the reaper
        tokens = ask.tokens if ask.tpm is not None else 0
        undo = [keys[2], keys[3], keys[4], keys[5], keys[6]]
        released = self._batch.submit("release", undo, [ask.call_id, str(tokens), str(ask.cost)])
        self._settling.add(released)  # `drain` waits for it too
        released.add_done_callback(functools.partial(self._released, ask, keys, attempt))

    def _released(
        self, ask: Ask, keys: list[str], attempt: int, future: asyncio.Future[Any]
    ) -> None:
        self._settling.discard(future)
        if future.cancelled() or future.exception() is None:
            return
        if self._again_later(future.exception(), attempt, self._release, ask, keys, attempt + 1):
            return
        # Left to the reaper, which settles it at its reservation (the operator's side).
        log.warning(
            "could not give back an unused admission", extra={"error": repr(future.exception())}
        )

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
        row: dict[str, Any],
    ) -> Settlement:
        """A call's corrections, noted on this replica, ready for `settle`."""
        holds_slot = slot and self.in_flight.released(key_id, call_id)
        tpm_key = self.version_key
        if window is not None:
            tpm_key = self.counter.key(f"tpm:{key_id}", window)
            self.counter.corrected(f"tpm:{key_id}", window, token_delta)
        else:
            token_delta = 0
        lease_keys, encoded = self.leases.settling(lease, budget_delta, row)
        keys = [self.in_flight.key(key_id), tpm_key, *lease_keys]
        args = [call_id, "1" if holds_slot else "0", str(token_delta), str(budget_delta), encoded]
        return Settlement(keys, args, lease)

    def settle(self, settlement: Settlement, attempt: int = 0) -> None:
        """Send `_SETTLE` with the next batch, off the response path (`drain` waits for it).

        A settlement that failed is sent again a moment later (it is safe to
        run twice), up to `RELEASE_TRIES` times; after that, or once the batch
        closed, the call's lease is given up to the reaper, which settles it at
        its reservation (errs on the operator's side).
        """
        if attempt == 0:
            self._open -= 1
        if self._batch.closed:
            self.leases.abandon(settlement.lease)
            return
        sent = self._batch.submit("settle", settlement.keys, settlement.args, idle=self._open <= 0)
        self._settling.add(sent)
        sent.add_done_callback(functools.partial(self._settled, settlement, attempt))

    def _settled(self, settlement: Settlement, attempt: int, sent: asyncio.Future[Any]) -> None:
        self._settling.discard(sent)
        lease = settlement.lease
        error = None if sent.cancelled() else sent.exception()
        if self._again_later(error, attempt, self.settle, settlement, attempt + 1):
            return
        if sent.cancelled() or error is not None:
            self.leases.abandon(lease)
            if error is not None:
                log.warning("could not correct limits after a call", extra={"error": repr(error)})
            return
        done = int(sent.result())
        if done == -1:  # no such lease: Redis may have lost its data, which takes a look
            task = asyncio.get_running_loop().create_task(self._lease_lost(lease, done))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        else:
            self.leases.settled_now(lease, done)

    def _again_later(
        self, error: BaseException | None, attempt: int, send: Callable[..., None], *args: Any
    ) -> bool:
        """Send a step lost with its connection or its answer again a moment later.

        Only for what is safe to run twice; `drain` waits for it. False: not sent again.
        """
        if not isinstance(error, _LOST) or attempt + 1 >= RELEASE_TRIES or self._batch.closed:
            return False

        async def later() -> None:
            await asyncio.sleep(again_in(attempt))
            send(*args)

        task = asyncio.get_running_loop().create_task(later())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return True

    async def _lease_lost(self, lease: Lease, done: int) -> None:
        try:
            await self.leases.settled(lease, done)
        except (RedisError, OSError) as exc:
            self.leases.abandon(lease)
            log.warning("could not correct limits after a call", extra={"error": repr(exc)})

    async def close(self) -> None:
        for item in list(self._settling):  # steps waiting to be sent again: the reaper's now
            if isinstance(item, asyncio.Task):
                item.cancel()
        await self._batch.close()

    @property
    def busy(self) -> bool:
        return bool(self._settling)

    def pending(self) -> list[asyncio.Future[Any]]:
        """What `drain` waits for: settlements and undoings on their way, or to be sent again."""
        return list(self._settling)

    async def drain(self) -> None:
        """Wait for the settlements on their way (at shutdown, and in tests)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


def _limit(value: int | None) -> str:
    return "" if value is None else str(value)
