"""`GET /usage`: what the calling key spent, and what it has left. A key sees only its own."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from chat_api.calls import Caller
from chat_api.errors import BadRequest
from chat_api.http_responses import JSONResponse
from chat_api.limits.budgets import period_bounds, utcnow
from chat_api.routes.deps import CallerDep, runtime_of
from chat_api.routes.schemas import simple_errors
from chat_api.store.ledger import dollars

router = APIRouter(tags=["usage"])


def parse_day(value: str | None, name: str) -> datetime | None:
    """`2026-11-25` or a full ISO time, as UTC; a clear 400 otherwise (an empty value too)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be a date like 2026-11-25.", param=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get(
    "/usage",
    responses=simple_errors(
        e400="'since' or 'until' is not a date.",
        e401="A client key is required and was missing or wrong.",
        e429="Too many failed attempts with a wrong key from this address; see Retry-After.",
    ),
)
async def my_usage(
    request: Request,
    caller: CallerDep,
    since: str | None = Query(None, json_schema_extra={"format": "date"}),
    until: str | None = Query(None, json_schema_extra={"format": "date"}),
) -> Response:
    """Totals, by model and by day, for the calling key, with its budget and limits."""
    ledger = runtime_of(request).ledger
    await ledger.catch_up()
    key_id = caller.key_id if caller else None
    body: dict[str, Any] = await ledger.summary(
        key_id=key_id, since=parse_day(since, "since"), until=parse_day(until, "until")
    )
    body["key"] = {"id": key_id, "name": caller.name if caller else None}
    body["limits"] = {
        "rpm": caller.rpm if caller else None,
        "tpm": caller.tpm if caller else None,
        # Calls it may have in progress at once: its own cap, else the server's default.
        "max_in_flight": _in_flight_cap(request, caller),
        "models": list(caller.models) if caller and caller.models else None,
    }
    body["budget"] = None
    if caller is not None and caller.key_id is not None and caller.budget_usd is not None:
        _, start, reset_in = period_bounds(caller.budget_period, utcnow())
        spent = dollars(await ledger.spent(caller.key_id, start))
        # From the spend as shown, so that spent and remaining add up to the limit on screen.
        remaining = max(Decimal(0), caller.budget_usd - Decimal(repr(spent)))
        body["budget"] = {
            "limit_usd": dollars(caller.budget_usd),
            "period": caller.budget_period,
            "spent_usd": spent,
            "remaining_usd": dollars(remaining),
            "renews_in_seconds": int(reset_in) if caller.budget_period != "total" else None,
        }
    return JSONResponse(body)


def _in_flight_cap(request: Request, caller: Caller | None) -> int | None:
    if caller is None or caller.key_id is None:
        return None
    if caller.max_in_flight is not None:
        return caller.max_in_flight
    return runtime_of(request).settings.max_in_flight or None
