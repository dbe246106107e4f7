"""The meter used in every mode: checks a key's limits before a call, records after.

For a client key, `admit` counts the request against its requests/minute,
the worst-case tokens against its tokens/minute, and reserves the worst-case
cost against its budget; any refusal is a 429 with `Retry-After` and
OpenAI's `x-ratelimit-*` headers. Calls by the master key, or with keys off,
are only recorded. `settle` queues the ledger row and the corrections; a
background task applies the corrections, so nothing waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from chat_api.catalog import Catalog
from chat_api.errors import ChatAPIError, RateLimited
from chat_api.limits.budgets import Budgets, period_bounds, utcnow
from chat_api.limits.counters import Counter
from chat_api.meter import Admission, Caller, CallResult, reset_duration

if TYPE_CHECKING:
    from chat_api.engine import CallContext, Prepared

log = logging.getLogger("chat_api.limits")

MICRO = Decimal(1_000_000)
# Completion tokens reserved when a request sets no max_tokens.
DEFAULT_COMPLETION_RESERVE = 4096

Sink = Callable[[CallResult], None]
SpentSince = Callable[[str, Any], Coroutine[Any, Any, Decimal]]


def to_micro(amount: Decimal) -> int:
    return int((amount * MICRO).to_integral_value(rounding="ROUND_CEILING"))


@dataclass(slots=True)
class _Recorded:
    meter: KeyMeter

    def settle(self, result: CallResult) -> None:
        result.cost = self.meter.catalog.resolve(result.model).cost(
            result.prompt_tokens, result.completion_tokens
        )
        self.meter.sink(result)


@dataclass(slots=True)
class _Limited:
    meter: KeyMeter
    caller: Caller
    token_window: int | None
    tokens_reserved: int
    bucket: str | None
    micro_reserved: int

    def settle(self, result: CallResult) -> None:
        info = self.meter.catalog.resolve(result.model)
        result.cost = info.cost(result.prompt_tokens, result.completion_tokens)
        self.meter.sink(result)
        self.meter.later(self._correct(result))

    async def _correct(self, result: CallResult) -> None:
        key_id = self.caller.key_id
        assert key_id is not None
        if self.token_window is not None:
            delta = result.total_tokens - self.tokens_reserved
            await self.meter.counter.add(f"tpm:{key_id}", self.token_window, delta)
        if self.bucket is not None:
            delta = to_micro(result.cost) - self.micro_reserved
            await self.meter.budgets.adjust(key_id, self.bucket, delta)


class KeyMeter:
    """Limits and records calls; see the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        counter: Counter,
        budgets: Budgets,
        sink: Sink,
        spent_since: SpentSince,
    ) -> None:
        self.catalog = catalog
        self.counter = counter
        self.budgets = budgets
        self.sink = sink
        self._spent_since = spent_since
        self._tasks: set[asyncio.Task[None]] = set()
        self._recorded = _Recorded(self)

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("could not correct a limit after a call", extra={"error": repr(exc)})

    async def drain(self) -> None:
        """Wait for queued corrections (at shutdown, and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def admit(self, ctx: CallContext, prepared: Prepared) -> Admission:
        caller = ctx.caller
        if caller is None or caller.key_id is None:
            return self._recorded
        key_id = caller.key_id
        headers: dict[str, str] = {}
        if caller.rpm is not None:
            hit = await self.counter.hit(f"rpm:{key_id}", 1, caller.rpm)
            headers.update(_rate_headers("requests", caller.rpm, hit.used, hit.reset_in))
            if not hit.allowed:
                raise RateLimited(
                    f"This key is limited to {caller.rpm} requests a minute. "
                    f"Try again in {math.ceil(hit.reset_in)} seconds.",
                    retry_after=hit.reset_in,
                    headers=headers,
                )
        completion_reserve = (prepared.max_tokens or DEFAULT_COMPLETION_RESERVE) * prepared.choices
        token_window: int | None = None
        tokens = 0
        if caller.tpm is not None:
            tokens = prepared.prompt_estimate + (prepared.max_tokens or 0) * prepared.choices
            hit = await self.counter.hit(f"tpm:{key_id}", tokens, caller.tpm)
            headers.update(_rate_headers("tokens", caller.tpm, hit.used, hit.reset_in))
            if not hit.allowed:
                await self._undo_request(caller)
                raise RateLimited(
                    f"This key is limited to {caller.tpm} tokens a minute. "
                    f"Try again in {math.ceil(hit.reset_in)} seconds.",
                    retry_after=hit.reset_in,
                    kind="tokens",
                    headers=headers,
                )
            token_window = hit.window
        bucket: str | None = None
        reserved = 0
        if caller.budget_usd is not None:
            bucket, start, reset_in = period_bounds(caller.budget_period, utcnow())
            worst = prepared.model.cost(prepared.prompt_estimate, completion_reserve)
            limit = to_micro(caller.budget_usd)

            async def seed() -> int:
                return to_micro(await self._spent_since(key_id, start))

            try:
                reserved = await self.budgets.reserve(
                    key_id, bucket, max(1, to_micro(worst)), limit, seed
                )
            except ChatAPIError:
                await self._undo(caller, token_window, tokens)
                raise
            if reserved == 0:
                await self._undo(caller, token_window, tokens)
                when = (
                    f"It renews in {_duration(reset_in)}."
                    if caller.budget_period in ("daily", "monthly")
                    else "Ask the operator to raise it."
                )
                raise RateLimited(
                    f"This key has used up its budget of ${caller.budget_usd}. {when}",
                    retry_after=reset_in,
                    headers={**headers, "x-ratelimit-limit-budget-usd": str(caller.budget_usd)},
                    code="insufficient_quota",
                )
        ctx.headers.update(headers)
        return _Limited(self, caller, token_window, tokens, bucket, reserved)

    async def _undo_request(self, caller: Caller) -> None:
        assert caller.key_id is not None
        if caller.rpm is not None:
            window, _ = divmod(int(utcnow().timestamp()), 60)
            await self.counter.add(f"rpm:{caller.key_id}", window, -1)

    async def _undo(self, caller: Caller, token_window: int | None, tokens: int) -> None:
        await self._undo_request(caller)
        if token_window is not None and caller.key_id is not None:
            await self.counter.add(f"tpm:{caller.key_id}", token_window, -tokens)


def _rate_headers(kind: str, limit: int, used: int, reset_in: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
        f"x-ratelimit-reset-{kind}": reset_duration(reset_in),
    }


def _duration(seconds: float) -> str:
    if seconds >= 7200:
        return f"{round(seconds / 3600)} hours"
    if seconds >= 120:
        return f"{round(seconds / 60)} minutes"
    return f"{math.ceil(seconds)} seconds"
