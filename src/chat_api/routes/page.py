"""`GET /page/config`: what the chat page at `/` must know about this server before it starts.

Read-only and open (it tells nothing a first chat would not): whether the server asks
for access keys, so the page asks for one on load and shows its key control only
then, and whether it answers from the demo model. Not part of the public API, so
kept out of the OpenAPI document.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from chat_api.http_responses import JSONResponse
from chat_api.routes.deps import runtime_of

router = APIRouter(include_in_schema=False)


@router.get("/page/config")
async def page_config(request: Request) -> Response:
    settings = runtime_of(request).settings
    return JSONResponse(
        {"keys": settings.keys_enabled, "demo": settings.demo},
        headers={"Cache-Control": "no-cache"},
    )
