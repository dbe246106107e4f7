"""A fake OpenAI that bills the way OpenAI does, for the money tests.

`POST /v1/chat/completions`, whole and streamed. The whole prompt is billed
the moment a call arrives (`billing.prompt_tokens`), and the answer writes
`write` tokens (default: up to the request's `max_tokens`, else the model's
own ceiling), for each of `n` choices. A whole answer is generated first and
billed in full, even if the client has left. A stream bills each token as it
is sent, one token a chunk, and stops when the client closes it. A prompt
longer than the model's context is refused unbilled, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send

from tests.fakes.billing import Biller, output_limit, prompt_tokens

CONTEXT = {"gpt-4": 8_192}
TOKEN = "tok "  # one token of output: four bytes, like an English token


@dataclass
class Behaviour:
    write: int | None = None  # tokens each choice writes; None: as many as allowed
    delay: float = 0.0  # before the answer starts
    token_interval: float = 0.0  # between streamed tokens
    hold: threading.Event | None = None  # when set: answers wait until it is set


class BillingUpstream:
    def __init__(self) -> None:
        self.biller = Biller()
        self.behaviour = Behaviour()
        self.api_key = "sk-test-billing-upstream-0123456789abcdef"
        self.calls = 0
        self.closed_early = 0
        self.held = 0  # calls waiting on `behaviour.hold` now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.calls += 1
        model = str(body.get("model"))
        if prompt_tokens(body) > CONTEXT.get(model, 128_000):
            await _json(send, 400, {"error": {"message": "context_length_exceeded"}})
            return
        bill = self.biller.open(body)
        behaviour = self.behaviour
        choices = int(body.get("n") or 1)
        per_choice = min(output_limit(body), behaviour.write or output_limit(body))
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.hold is not None:
            self.held += 1
            await asyncio.to_thread(behaviour.hold.wait)
            self.held -= 1
        if not body.get("stream"):
            bill.completion_tokens = per_choice * choices  # generated whether or not anyone reads
            usage = _usage(bill.prompt_tokens, bill.completion_tokens)
            answer = {
                "id": "chatcmpl-bill",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": TOKEN * per_choice},
                        "finish_reason": "length",
                    }
                    for i in range(choices)
                ],
                "usage": usage,
            }
            await _json(send, 200, answer)
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        head = {"id": "chatcmpl-bill", "object": "chat.completion.chunk", "model": model}
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for _ in range(per_choice):
                if gone.is_set():
                    self.closed_early += 1
                    return
                bill.completion_tokens += choices
                deltas = [{"index": i, "delta": {"content": TOKEN}} for i in range(choices)]
                chunk = {**head, "choices": deltas}
                await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
                await asyncio.sleep(behaviour.token_interval)
            end = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            tail = _event(end)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = _usage(bill.prompt_tokens, bill.completion_tokens)
                tail += _event({**head, "choices": [], "usage": usage})
            await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})
        except OSError:
            self.closed_early += 1
        finally:
            watcher.cancel()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _json(send: Send, status: int, body: Any) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": raw})
