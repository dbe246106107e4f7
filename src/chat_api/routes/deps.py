"""What every route shares: the runtime (and its engine), the request id, the body, the caller."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from chat_api.calls import CallContext, Caller
from chat_api.engine import Engine
from chat_api.errors import BadRequest
from chat_api.providers.base import Completion
from chat_api.redact import relayable
from chat_api.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    """What the running app holds (`runtime.Runtime`): the one thing routes read from the app."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def engine_of(request: Request) -> Engine:
    return runtime_of(request).engine


def request_id_of(request: Request) -> str:
    request_id: str = request.scope["state"]["request_id"]
    return request_id


def relayed(answer: Completion) -> Completion:
    """A whole upstream answer as it may be relayed (`redact.relayable`), as
    `operations.base.parse_event` does for stream events.

    Its `error` (a stored response that failed carries OpenAI's) is scrubbed of keys,
    every string if it holds a remembered secret; otherwise its bytes go unchanged.
    """
    raw, data = relayable(answer.raw, answer.data)
    if raw is answer.raw:
        return answer
    return Completion(raw, data, answer.upstream_request_id)


MAX_JSON_DEPTH = 254  # what orjson can write back out: the upstream call serializes the body


async def read_json(request: Request) -> Any:
    """The parsed body; a clear 400 when it is empty, not JSON, or nested too deeply."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = orjson.loads(raw)  # refuses 1,024 levels and more itself
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    # Only a body with that many brackets can be that deep: counting them is nearly free,
    # writing the body out (which fails past 254 levels) is done only then.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps(data)
        except orjson.JSONEncodeError:
            raise BadRequest(
                f"The request body is nested too deeply: at most {MAX_JSON_DEPTH} levels "
                "of arrays and objects are accepted.",
                code="invalid_json",
            ) from None
    return data


async def authenticate(request: Request) -> Caller | None:
    """The caller behind the request's key; None when keys are off."""
    guard = runtime_of(request).guard
    if guard is None:
        return None
    caller: Caller = await guard.authenticate(request)
    return caller


async def authenticate_call(request: Request) -> Caller | None:
    """As `authenticate`, for routes whose every upstream call goes through admission.

    The key may come from the cache unchecked against the key set's
    version: admission checks it in the same Redis round trip as the
    limits, and reads the key again when it changed (auth.Guard.recheck).
    """
    guard = runtime_of(request).guard
    if guard is None:
        return None
    caller: Caller = await guard.authenticate(request, call=True)
    return caller


def context(request: Request, endpoint: str, caller: Caller | None) -> CallContext:
    """The call's context, also left in the request's state for the log line."""
    ctx = CallContext(request_id=request_id_of(request), endpoint=endpoint, caller=caller)
    request.state.call = ctx
    return ctx


CallerDep = Annotated[Caller | None, Depends(authenticate)]
# For routes that start a call: every path to the upstream goes through `Engine` admission.
CallingCallerDep = Annotated[Caller | None, Depends(authenticate_call)]
