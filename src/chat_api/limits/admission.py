"""Admission: whether a call may start, what it reserves, and how it settles.

For a client key, `KeyMeter.admit` counts the request against its
requests/minute, takes one of its slots for calls in flight, counts the
call's worst case (`Prepared.worst_tokens`) against its tokens/minute, and
reserves the worst-case cost (`Prepared.worst_cost`) against its budget. A
call whose worst case does not fit what the budget has left is refused
before it starts, with a sentence saying what is left and what would fit.
Any refusal is a 429 with OpenAI's `x-ratelimit-*` headers, and
`Retry-After` when waiting helps. Calls by the master key, or with keys
off, are only recorded.

`Admission.settle` runs exactly once when an admitted call ends, whatever
happened: it queues the ledger row (never on the response path) and the
corrections (the real tokens and cost replace the reservation; the slot is
given back), applied off the response path. With Redis, every admitted
call holds a lease until its row is committed, so a replica that dies
loses no row (see `limits/leases.py`), and admission and the corrections
are one script step each, which calls at the same moment share one round
trip for (`limits/shared_admission.py`); admission's step also checks
that the key was not revoked meanwhile. While Redis is away, each limit
is taken in turn here, with its own fallback.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chat_api import clock
from chat_api.calls import CallContext, Caller, CallResult, Prepared, new_call_id
from chat_api.errors import RateLimited
from chat_api.limits.budgets import Budgets, Periods
from chat_api.limits.counters import Counter, minute_of
from chat_api.limits.in_flight import InFlight
from chat_api.limits.leases import Lease, RedisLeases
from chat_api.limits.shared_admission import (
    BUDGET_SHORT,
    BUDGET_UNKNOWN,
    EPOCH_CHANGED,
    IN_FLIGHT_FULL,
    KEY_SET_CHANGED,
    RPM_FULL,
    TPM_FULL,
    Ask,
    SharedAdmission,
)
from chat_api.store.ledger import row_of

# What an unlimited call (the master key's, or any with keys off) is admitted as: no limit,
# no slot, only its lease (its ledger row names no key, as the caller's own does).
_UNLIMITED = Caller(key_id="", name="unlimited")

log = logging.getLogger("chat_api.limits")

MICRO = Decimal(1_000_000)
STOP_WAITS = 5.0  # seconds a stop waits for the corrections on their way

Sink = Callable[[CallResult, dict[str, Any]], None]  # a call's result, and its ledger row
SpentSince = Callable[..., Coroutine[Any, Any, Decimal]]  # (key id, since, *, queued)
Recheck = Callable[[Caller], Awaitable[Caller]]


class Admission(Protocol):
    """A call let through; `settle` must be called exactly once when it ends."""

    def settle(self, result: CallResult) -> None: ...


class Meter(Protocol):
    async def admit(self, ctx: CallContext, prepared: Prepared) -> Admission: ...


def to_micro(amount: Decimal) -> int:
    """Micro-dollars, rounded up: money errs on the operator's side."""
    return int((amount * MICRO).to_integral_value(rounding=ROUND_CEILING))


def dollars(micro: int) -> str:
    """A micro-dollar amount as people read it: $0.004213."""
    return f"${Decimal(micro) / MICRO:.6f}"


@dataclass(slots=True)
class _Recorded:
    meter: KeyMeter

    def settle(self, result: CallResult) -> None:
        self.meter.sink(result, self.meter.row_of(result))


@dataclass(slots=True)
class _Limited:
    meter: KeyMeter
    key_id: str
    call_id: str
    in_flight: bool
    token_window: int | None
    tokens_reserved: int
    bucket: str | None
    micro_reserved: int
    lease: Lease | None
    shared: bool = False  # admitted in one Redis round trip: corrected in one too

    def settle(self, result: CallResult) -> None:
        result.call_id = self.call_id
        meter = self.meter
        row = meter.row_of(result)  # built once: queued for the ledger, and kept by the lease
        meter.sink(result, row)
        cost = to_micro(row["cost_usd"])
        if self.shared and meter.shared is not None:
            assert self.lease is not None  # admitted in one round trip: always under a lease
            meter.shared.settle(
                meter.shared.settling(
                    key_id=self.key_id,
                    call_id=self.call_id,
                    slot=self.in_flight,
                    window=self.token_window,
                    token_delta=result.total_tokens - self.tokens_reserved,
                    budget_delta=cost - self.micro_reserved if self.bucket else 0,
                    lease=self.lease,
                    row=row,
                )
            )
        else:
            meter.later(self._correct(result, row, cost))

    async def _correct(self, result: CallResult, row: dict[str, Any], cost: int) -> None:
        meter = self.meter
        if self.in_flight:
            await meter.in_flight.give_back(self.key_id, self.call_id)
        if self.token_window is not None:
            delta = result.total_tokens - self.tokens_reserved
            await meter.counter.add(f"tpm:{self.key_id}", self.token_window, delta)
        delta = cost - self.micro_reserved if self.bucket is not None else 0
        leases, lease = meter.leases, self.lease
        if leases is not None and lease is not None:
            try:
                await leases.settle(lease, delta, row)
            except BaseException:
                leases.abandon(lease)  # the reaper settles it at its reservation
                raise
        elif self.bucket is not None:
            await meter.budgets.adjust(self.key_id, self.bucket, delta)


class KeyMeter:
    """Limits and records calls; see the module docstring."""

    def __init__(
        self,
        counter: Counter,
        budgets: Budgets,
        in_flight: InFlight,
        sink: Sink,
        spent_since: SpentSince,
        *,
        default_max_in_flight: int,
        leases: RedisLeases | None = None,
        row_of: Callable[[CallResult], dict[str, Any]] = row_of,
        shared: SharedAdmission | None = None,
    ) -> None:
        self.counter = counter
        self.leases = leases
        self.shared = shared
        self.recheck: Recheck | None = None  # the Guard's: a key read again after a change
        self.row_of = row_of
        self.budgets = budgets
        self.in_flight = in_flight
        self.sink = sink
        self._spent_since = spent_since
        self._default_max_in_flight = default_max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._recorded = _Recorded(self)
        self._periods = Periods()
        self._stop_by: float | None = None  # the loop's time a stop waits until

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("could not correct a limit after a call", extra={"error": repr(exc)})

    def rows_written(self, call_ids: list[str]) -> None:
        """The ledger committed these rows: their calls' leases can go."""
        if self.leases is not None and any(c in self.leases.held for c in call_ids):
            self.later(self.leases.written(call_ids))

    async def stop(self, limit: float = STOP_WAITS) -> None:
        """At shutdown: wait for queued corrections, about `limit` seconds at most.

        What is still on its way then (Redis not answering) is left to the
        reaper, which settles each call at its reservation (the operator's side).
        """
        loop = asyncio.get_running_loop()
        # One limit for the stop's waits together (it waits twice: before and after the
        # ledger's last rows, whose "rows written" then get a second at least).
        if self._stop_by is None:
            self._stop_by = loop.time() + limit
        deadline = max(self._stop_by, loop.time() + 1.0)
        while loop.time() < deadline:
            pending = [*self._tasks, *(self.shared.pending() if self.shared is not None else ())]
            if not pending:
                return
            await asyncio.wait(pending, timeout=deadline - loop.time())
        late = list(self._tasks)  # still waiting on Redis: given up (their leases run out)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for queued corrections (at shutdown, and in tests)."""
        while self._tasks or (self.shared is not None and self.shared.busy):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if self.shared is not None:
                await self.shared.drain()

    def cap_of(self, caller: Caller) -> int | None:
        """The calls in flight a key may have; None: no cap."""
        cap = caller.max_in_flight if caller.max_in_flight is not None else None
        if cap is None:
            cap = self._default_max_in_flight or None
        return cap

    async def admit(self, ctx: CallContext, prepared: Prepared) -> Admission:
        caller = ctx.caller
        if caller is None or caller.key_id is None:
            return await self._unlimited(ctx, prepared)
        shared = self.shared
        if shared is not None and (shared.ready or await self._back_before_refusing(caller)):
            try:
                try:
                    return await self._admit_shared(ctx, caller, prepared, shared)
                except _KeySetChanged:
                    caller = ctx.caller = await self._recheck(caller)
                    return await self._admit_shared(ctx, caller, prepared, shared)
            except (RedisError, OSError) as exc:
                shared.counter.went_down(exc)  # the step way, with each limit's fallback
        if caller.key_version is not None:  # the step way does not check the key set
            caller = ctx.caller = await self._recheck(caller)
        return await self._admit_steps(ctx, caller, prepared)

    async def _back_before_refusing(self, caller: Caller) -> bool:
        """While Redis counts as away, a budgeted call (503 on the step way) asks it first.

        Other calls fall back to this replica's share at once, without waiting on Redis.
        """
        assert self.shared is not None
        return caller.budget_usd is not None and await self.shared.counter.reach.answers_again()

    async def _unlimited(self, ctx: CallContext, prepared: Prepared) -> Admission:
        """Only recorded; with Redis, under a lease too, so a replica's death loses no row.

        The lease goes in the shared script runs, as a client key's admission
        does (its Redis round trip shared with the calls of that moment, the
        epoch checked); while Redis is counted as away, none is taken.
        """
        if self.leases is None:
            return self._recorded
        shared = self.shared
        if shared is not None:
            if shared.ready:
                try:
                    return await self._admit_shared(ctx, _UNLIMITED, prepared, shared)
                except (RedisError, OSError) as exc:
                    shared.counter.went_down(exc)
            return self._recorded  # Redis is away: not waited for; the row is this process's
        lease = Lease.of(new_call_id(), "", ctx, prepared)
        try:
            await self.leases.open(lease)
        except (RedisError, OSError) as exc:
            log.warning("could not take a lease for a call", extra={"error": type(exc).__name__})
            return self._recorded  # the row is only as safe as this process
        # Settled as a limited call with no limits: only the lease (and its row) to settle.
        return _Limited(self, "", lease.call_id, False, None, 0, None, 0, lease)

    async def _recheck(self, caller: Caller) -> Caller:
        return await self.recheck(caller) if self.recheck is not None else caller

    async def _admit_shared(
        self, ctx: CallContext, caller: Caller, prepared: Prepared, shared: SharedAdmission
    ) -> Admission:
        """Every limit and the lease in one round trip (limits/shared_admission.py).

        `_UNLIMITED` (the master key, or keys off): only the lease.
        """
        assert caller.key_id is not None
        key_id = caller.key_id
        call_id = new_call_id()
        now = clock.now()  # one reading for the window, the period, the lease and its hold
        lease = Lease.of(call_id, key_id, ctx, prepared, now)
        window, reset_in = minute_of(now)
        cap = self.cap_of(caller) if caller is not _UNLIMITED else None
        tokens = prepared.worst_tokens
        bucket: str | None = None
        budget_key: str | None = None
        cost, limit, renews_in = 0, None, 0.0
        seed: Callable[[], Awaitable[int]] | None = None
        if caller.budget_usd is not None:
            bucket, start, renews_in = self._periods.bounds(caller.budget_period, now)
            limit = to_micro(caller.budget_usd)
            cost = max(1, to_micro(prepared.worst_cost))
            budget_key = shared.budgets.key(key_id, bucket)
            seed, lease.seed = self._seeds(key_id, start)
            lease.bucket, lease.reserved, lease.budget_key = bucket, cost, budget_key
        ask = Ask(
            key_id=key_id,
            call_id=call_id,
            version=caller.key_version,
            rpm=caller.rpm,
            cap=cap,
            tokens=tokens,
            tpm=caller.tpm,
            window=window,
            now=now,
            budget_key=budget_key,
            cost=cost,
            budget_limit=limit,
            lease=lease,
        )
        answer = await shared.admit(ask)
        if answer.outcome == EPOCH_CHANGED:
            # Redis lost its data: this replica's calls in flight go back (their leases,
            # their reservations) before it admits one more against what is left.
            await shared.leases.check()
            answer = await shared.admit(ask)
            if answer.outcome == EPOCH_CHANGED:
                raise RedisConnectionError("Redis lost its data again")  # the step way
        if answer.outcome == BUDGET_UNKNOWN and budget_key is not None and seed is not None:
            await shared.budgets.seed(budget_key, seed)
            answer = await shared.admit(ask)
        outcome = answer.outcome
        if outcome == KEY_SET_CHANGED:
            raise _KeySetChanged()
        headers: dict[str, str] = {}
        reset = reset_duration(reset_in)  # the same minute for both limits
        if caller.rpm is not None:
            headers.update(_rate_headers("requests", caller.rpm, answer.requests, reset))
        if outcome == RPM_FULL:
            raise _requests_refusal(caller, reset_in, headers)
        if outcome == IN_FLIGHT_FULL:
            assert cap is not None
            raise _in_flight_refusal(cap, headers)
        if caller.tpm is not None:
            headers.update(_rate_headers("tokens", caller.tpm, answer.tokens, reset))
        if outcome == TPM_FULL:
            raise _tokens_refusal(caller, reset_in, headers)
        if outcome in (BUDGET_SHORT, BUDGET_UNKNOWN):
            spent = answer.spent if outcome == BUDGET_SHORT else limit or 0
            raise _budget_refusal(caller, prepared, spent, cost, renews_in, headers)
        ctx.headers.update(headers)
        token_window = window if caller.tpm is not None else None
        return _Limited(
            self, key_id, call_id, cap is not None, token_window, tokens, bucket, cost, lease, True
        )

    def _seeds(
        self, key_id: str, start: Any
    ) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[int]]]:
        """What the key spent in its period by the ledger: with rows still queued, and without."""

        async def seed() -> int:
            return to_micro(await self._spent_since(key_id, start))

        async def committed() -> int:  # a lease's own queued row is put back with the lease
            return to_micro(await self._spent_since(key_id, start, queued=False))

        return seed, committed

    async def _admit_steps(self, ctx: CallContext, caller: Caller, prepared: Prepared) -> Admission:
        """Each limit in turn (in this process, or while Redis is away), undone on a refusal."""
        assert caller.key_id is not None
        key_id = caller.key_id
        call_id = new_call_id()
        lease = Lease.of(call_id, key_id, ctx, prepared) if self.leases is not None else None
        headers: dict[str, str] = {}
        undo: list[Coroutine[Any, Any, None]] = []
        try:
            if caller.rpm is not None:
                hit = await self.counter.hit(f"rpm:{key_id}", 1, caller.rpm)
                reset = reset_duration(hit.reset_in)
                headers.update(_rate_headers("requests", caller.rpm, hit.used, reset))
                if not hit.allowed:
                    raise _requests_refusal(caller, hit.reset_in, headers)
                undo.append(self.counter.add(f"rpm:{key_id}", hit.window, -1))
            cap = self.cap_of(caller)
            if cap is not None:
                if not await self.in_flight.take(key_id, call_id, cap):
                    raise _in_flight_refusal(cap, headers)
                undo.append(self.in_flight.give_back(key_id, call_id))
            token_window: int | None = None
            tokens = prepared.worst_tokens
            if caller.tpm is not None:
                hit = await self.counter.hit(f"tpm:{key_id}", tokens, caller.tpm, whole=False)
                reset = reset_duration(hit.reset_in)
                headers.update(_rate_headers("tokens", caller.tpm, hit.used, reset))
                if not hit.allowed:
                    raise _tokens_refusal(caller, hit.reset_in, headers)
                token_window = hit.window
                undo.append(self.counter.add(f"tpm:{key_id}", hit.window, -tokens))
            bucket: str | None = None
            reserved = 0
            if caller.budget_usd is not None:
                bucket, reserved = await self._reserve(caller, key_id, prepared, headers, lease)
            elif lease is not None:
                await self._open_lease(lease)
        except BaseException:
            for step in reversed(undo):
                await step
            raise
        for step in undo:
            step.close()  # kept: these were only needed to undo a refusal
        ctx.headers.update(headers)
        return _Limited(
            self, key_id, call_id, cap is not None, token_window, tokens, bucket, reserved, lease
        )

    async def _open_lease(self, lease: Lease) -> None:
        assert self.leases is not None
        if self.shared is not None and not self.shared.ready:
            return  # Redis is away: limits fell back; the row is only as safe as this process
        try:
            await self.leases.open(lease)
        except (RedisError, OSError) as exc:
            # Limits already fell back to this replica; the row is only as safe as this process.
            log.warning("could not take a lease for a call", extra={"error": type(exc).__name__})

    async def _reserve(
        self,
        caller: Caller,
        key_id: str,
        prepared: Prepared,
        headers: dict[str, str],
        lease: Lease | None = None,
    ) -> tuple[str, int]:
        assert caller.budget_usd is not None
        bucket, start, reset_in = self._periods.bounds(caller.budget_period, clock.now())
        limit = to_micro(caller.budget_usd)
        worst = max(1, to_micro(prepared.worst_cost))
        seed, committed = self._seeds(key_id, start)
        if lease is not None:
            lease.seed = committed  # its own queued rows are put back with their leases

        taken, used = await self.budgets.reserve(key_id, bucket, worst, limit, seed, lease)
        if taken:
            return bucket, worst
        raise _budget_refusal(caller, prepared, used, worst, reset_in, headers)


class _KeySetChanged(Exception):
    """The key set changed since the caller's key was cached: read the key again."""


def _requests_refusal(caller: Caller, reset_in: float, headers: dict[str, str]) -> RateLimited:
    return RateLimited(
        f"This key is limited to {caller.rpm} requests a minute. "
        f"Try again in {math.ceil(reset_in)} seconds.",
        retry_after=reset_in,
        headers=headers,
    )


def _in_flight_refusal(cap: int, headers: dict[str, str]) -> RateLimited:
    return RateLimited(
        f"This key already has {cap} calls in progress, its limit. "
        "Wait for one to finish, then try again.",
        retry_after=1.0,
        headers=headers,
        code="too_many_calls_in_flight",
    )


def _tokens_refusal(caller: Caller, reset_in: float, headers: dict[str, str]) -> RateLimited:
    return RateLimited(
        f"This key is limited to {caller.tpm} tokens a minute. "
        f"Try again in {math.ceil(reset_in)} seconds.",
        retry_after=reset_in,
        kind="tokens",
        headers=headers,
    )


def _budget_refusal(
    caller: Caller,
    prepared: Prepared,
    used: int,
    worst: int,
    reset_in: float,
    headers: dict[str, str],
) -> RateLimited:
    assert caller.budget_usd is not None
    left = max(0, to_micro(caller.budget_usd) - used)
    renews = caller.budget_period in ("daily", "monthly")
    return RateLimited(
        _refusal(caller, prepared, left, worst, renews, reset_in),
        # Waiting helps only for a budget that renews (calls in flight
        # also give back what they did not use, but that is not a promise).
        retry_after=reset_in if renews else None,
        headers={**headers, "x-ratelimit-limit-budget-usd": str(caller.budget_usd)},
        code="insufficient_quota",
    )


def _amount(budget: Decimal) -> str:
    """A budget as its owner wrote it: $5, $0.06."""
    return f"${budget.normalize():f}"


def _refusal(
    caller: Caller, prepared: Prepared, left: int, worst: int, renews: bool, reset_in: float
) -> str:
    """Why a call does not fit the budget, and what would."""
    assert caller.budget_usd is not None
    budget = caller.budget_usd
    when = f" It renews in {_duration(reset_in)}." if renews else ""
    if left <= 0:
        return (
            f"This key has nothing left of its {_amount(budget)} budget (calls still in "
            f"progress give back what they do not use when they finish).{when}"
        )
    model = prepared.model
    head = (
        f"This call could cost up to {dollars(worst)}, but this key has only {dollars(left)} "
        f"left of its {_amount(budget)} budget."
    )
    prompt_cost = to_micro(model.cost(prepared.prompt_bound, 0))
    per_token = model.cost(0, 1) * MICRO
    n = prepared.body.get("n")
    choices = n if isinstance(n, int) and n > 0 else 1
    if prompt_cost >= left or per_token <= 0:
        return f"{head} Send a shorter request.{when}"
    fits = int((left - prompt_cost) / (per_token * choices))
    if fits < 1:
        return f"{head} Send a shorter request.{when}"
    return f"{head} Set max_tokens to {fits} or less and it fits.{when}"


def reset_duration(seconds: float) -> str:
    """A wait as OpenAI writes it in `x-ratelimit-reset-*`: "120ms", "8.64s", "6m0s", "1h2m3s"."""
    milliseconds = max(0, round(seconds * 1000))
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds / 1000, 3600)
    minutes, rest = divmod(rest, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


_RATE_HEADERS = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}


def _rate_headers(kind: str, limit: int, used: int, reset: str) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers; `reset` as `reset_duration` writes it."""
    named_limit, remaining, reset_at = _RATE_HEADERS[kind]
    return {named_limit: str(limit), remaining: str(max(0, limit - used)), reset_at: reset}


def _duration(seconds: float) -> str:
    if seconds >= 7200:
        return f"{round(seconds / 3600)} hours"
    if seconds >= 120:
        return f"{round(seconds / 60)} minutes"
    return f"{math.ceil(seconds)} seconds"
