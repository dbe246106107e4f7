"""What every route shares: the engine, the request id, the body, the caller."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from chat_api.calls import CallContext, Caller
from chat_api.engine import Engine
from chat_api.errors import BadRequest


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def request_id_of(request: Request) -> str:
    request_id: str = request.scope["state"]["request_id"]
    return request_id


async def read_json(request: Request) -> Any:
    """The parsed body; a clear 400 when it is empty or not JSON."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


async def authenticate(request: Request) -> Caller | None:
    """The caller behind the request's key; None when keys are off."""
    guard = request.app.state.guard
    if guard is None:
        return None
    caller: Caller = await guard.authenticate(request)
    return caller


def context(request: Request, endpoint: str, caller: Caller | None) -> CallContext:
    """The call's context, also left in the request's state for the log line."""
    ctx = CallContext(request_id=request_id_of(request), endpoint=endpoint, caller=caller)
    request.state.call = ctx
    return ctx


SHUTDOWN_MESSAGE = "The server is restarting and had to stop this answer. Please send it again."


CallerDep = Annotated[Caller | None, Depends(authenticate)]
