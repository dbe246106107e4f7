"""`/admin`: managing client keys and reading everyone's usage. Master key only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from chat_api.calls import Caller
from chat_api.errors import BadRequest, Forbidden, NotFound
from chat_api.http_responses import JSONResponse
from chat_api.routes.deps import CallerDep, engine_of, read_json, runtime_of
from chat_api.routes.schemas import describe, simple_errors
from chat_api.routes.usage import parse_day
from chat_api.store.keys import KeySpec, KeyStore

_ERRORS = simple_errors(
    e400="The body or a parameter is not valid.",
    e401="The master key was missing or wrong.",
    e403="Keys are off, or the key is not the master key.",
    e429="Too many failed attempts with a wrong key from this address; see Retry-After.",
)
_KEY_ERRORS = {**_ERRORS, **simple_errors(e404="There is no key with that id.")}

router = APIRouter(prefix="/admin", tags=["admin"], responses=_ERRORS)


def _require_master(request: Request, caller: Caller | None) -> KeyStore:
    if caller is None:
        raise Forbidden("Keys are off. Set CHAT_API_MASTER_KEY to use the admin API.")
    if not caller.is_master:
        raise Forbidden("Only the master key may use the admin API.")
    return runtime_of(request).keys


@router.post(
    "/keys",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": KeySpec.model_json_schema()}},
        }
    },
)
async def create_key(request: Request, caller: CallerDep) -> Response:
    """Make a client key. The answer's `key` is the secret: it is shown this once."""
    keys = _require_master(request, caller)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    try:
        spec = KeySpec.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None
    allowed = engine_of(request).catalog.names
    for model in spec.models:
        if model not in allowed:
            raise BadRequest(
                f"The model '{model}' is not in CHAT_API_MODELS, so a key cannot be given it.",
                param="models",
            )
    record, secret = await keys.create(spec)
    return JSONResponse({"key": secret, **record.public()}, status_code=201)


@router.get("/keys")
async def list_keys(request: Request, caller: CallerDep) -> Response:
    """Every client key, without secrets."""
    keys = _require_master(request, caller)
    return JSONResponse({"keys": [record.public() for record in await keys.all()]})


@router.get("/keys/{key_id}", responses=_KEY_ERRORS)
async def show_key(key_id: str, request: Request, caller: CallerDep) -> Response:
    """One client key, without its secret."""
    keys = _require_master(request, caller)
    record = await keys.get(key_id)
    if record is None:
        raise NotFound(f"There is no key with id {key_id}.")
    return JSONResponse(record.public())


@router.delete("/keys/{key_id}", responses=_KEY_ERRORS)
async def revoke_key(key_id: str, request: Request, caller: CallerDep) -> Response:
    """Revoke a client key. Every replica refuses it from the next request on."""
    keys = _require_master(request, caller)
    record = await keys.revoke(key_id)
    if record is None:
        raise NotFound(f"There is no key with id {key_id}.")
    return JSONResponse(record.public())


@router.get("/usage")
async def all_usage(
    request: Request,
    caller: CallerDep,
    key_id: str | None = None,
    model: str | None = None,
    since: str | None = Query(None, json_schema_extra={"format": "date"}),
    until: str | None = Query(None, json_schema_extra={"format": "date"}),
) -> Response:
    """Usage of every key (or one, with `key_id`), by key, model and day."""
    _require_master(request, caller)
    ledger = runtime_of(request).ledger
    await ledger.catch_up()
    body: dict[str, Any] = await ledger.summary(
        key_id=key_id,
        all_keys=key_id is None,
        model=model,
        since=parse_day(since, "since"),
        until=parse_day(until, "until"),
    )
    return JSONResponse(body)
