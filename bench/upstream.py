"""A fast fake OpenAI upstream: raw asyncio protocol, httptools parser, uvloop.

It answers `POST /v1/chat/completions` (whole JSON, or an SSE stream in
chunked transfer encoding) and `POST /v1/responses` streamed (OpenAI's
`event:`/`data:` events, numbered) on keep-alive HTTP/1.1, and must never be the
bottleneck of a benchmark: there is no framework, every answer is built from
pre-rendered bytes, and stream chunks are driven by `call_later` timers rather
than one task per stream.

How it answers is set for the whole process by `POST /_bench/config` with a
JSON object of `Behaviour` fields, so the same upstream serves the direct
run and the gateway run of a scenario. Run as its own process:

    python -m bench.upstream --port 0     # prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import httptools
import orjson

CREATED = 1_700_000_000


@dataclass
class Behaviour:
    """How every answer is shaped until the next `/_bench/config`."""

    chunks: int = 20  # content chunks per stream
    interval: float = 0.0  # seconds between chunks; 0 streams as fast as the socket takes
    ttft: float = 0.0  # seconds before the first chunk (after the headers)
    latency: float = 0.0  # seconds before a non-streamed answer
    token: str = "tok "  # the text of each content chunk


def _head(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
        }
    )[:-1]


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


RESPONSE_ID = b"resp_" + b"0" * 48  # each stream writes its own id of the same width here


def _response_events(model: str, behaviour: Behaviour) -> tuple[bytes, bytes, list[bytes]]:
    """A streamed Response's events as OpenAI orders them: (before the text, after it, deltas).

    The response object carries RESPONSE_ID, for each stream to fill in.
    """
    sequence = 0
    item_id, text = "msg_bench", behaviour.token * behaviour.chunks
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": RESPONSE_ID.decode(),
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "model": model,
            "output": output,
            "usage": usage,
        }

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
        sequence += 1
        return b"event: %b\ndata: %b\n\n" % (kind.encode(), data)

    part: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    item: dict[str, Any] = {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "content": [],
        "role": "assistant",
    }
    before = b"".join(
        (
            event("response.created", response=response("in_progress", [], None)),
            event("response.in_progress", response=response("in_progress", [], None)),
            event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", **where, part=part),
        )
    )
    deltas = [
        event("response.output_text.delta", **where, delta=behaviour.token, logprobs=[])
        for _ in range(behaviour.chunks)
    ]
    part = {**part, "text": text}
    item = {**item, "status": "completed", "content": [part]}
    usage = {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": behaviour.chunks,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9 + behaviour.chunks,
    }
    after = b"".join(
        (
            event("response.output_text.done", **where, text=text, logprobs=[]),
            event("response.content_part.done", **where, part=part),
            event("response.output_item.done", output_index=0, item=item),
            event("response.completed", response=response("completed", [item], usage)),
        )
    )
    return before, after, deltas


class Answers:
    """Pre-rendered bytes for one model under one behaviour."""

    def __init__(self, model: str, behaviour: Behaviour) -> None:
        usage = {
            "prompt_tokens": 9,
            "completion_tokens": behaviour.chunks,
            "total_tokens": 9 + behaviour.chunks,
        }
        whole = orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": behaviour.token * behaviour.chunks,
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
        self.whole = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"x-request-id: req_bench\r\ncontent-length: %d\r\n\r\n%b" % (len(whole), whole)
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"x-request-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        head = _head(model)

        def event(body: bytes) -> bytes:
            return _http_chunk(b"data: " + head + b"," + body + b"}\n\n")

        delta = orjson.dumps({"content": behaviour.token})
        self.first = event(
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":'
            + orjson.dumps(behaviour.token)
            + b'},"logprobs":null,"finish_reason":null}]'
        )
        self.middle = event(
            b'"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":null}]'
        )
        finish = event(b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]')
        usage_event = event(b'"choices":[],"usage":' + orjson.dumps(usage))
        done = _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.tail_with_usage = finish + usage_event + done
        self.tail = finish + done
        self.chat_steps = [self.first, *[self.middle] * (behaviour.chunks - 1)][: behaviour.chunks]
        self._model = model
        self._behaviour = behaviour
        self._responses: tuple[bytes, bytes, list[bytes]] | None = None

    def responses(self) -> tuple[bytes, bytes, list[bytes]]:
        """A Response's events (before the text, after it, each delta as an HTTP chunk).

        Rendered on first use: a chat-only run never pays for them.
        """
        if self._responses is None:
            before, after, deltas = _response_events(self._model, self._behaviour)
            self._responses = (before, after, [_http_chunk(d) for d in deltas])
        return self._responses


class Upstream:
    """Process-wide state: the behaviour and its rendered answers."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self._answers: dict[str, Answers] = {}
        self.requests = 0

    def configure(self, values: dict[str, Any]) -> None:
        known = {f.name for f in fields(Behaviour)}
        self.behaviour = Behaviour(**{k: v for k, v in values.items() if k in known})
        self._answers.clear()

    def answers(self, model: str) -> Answers:
        answers = self._answers.get(model)
        if answers is None:
            answers = self._answers[model] = Answers(model, self.behaviour)
        return answers


class _Stream:
    """One SSE answer in flight, advanced by loop timers: `steps` written in turn, then `tail`."""

    __slots__ = ("handle", "next", "steps", "tail")

    def __init__(self, steps: list[bytes], tail: bytes) -> None:
        self.steps = steps  # shared by every stream of a behaviour: never changed
        self.tail = tail
        self.next = 0
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. Requests are answered in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.stream: _Stream | None = None
        self.pending: asyncio.TimerHandle | None = None
        self.paused = False

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stream is not None and self.stream.handle is not None:
            self.stream.handle.cancel()
        self.stream = None
        if self.pending is not None:
            self.pending.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        stream = self.stream
        if stream is not None and self.upstream.behaviour.interval <= 0:
            stream.handle = self.loop.call_soon(self._burst)

    # --- httptools callbacks ----------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        if self.url.startswith(b"/_bench/config"):
            self.upstream.configure(orjson.loads(body) if body else {})
            self._write_json(asdict(self.upstream.behaviour))
        elif self.url.startswith(b"/v1/chat/completions"):
            self._chat(orjson.loads(body))
        elif self.url.startswith(b"/v1/responses"):
            self._responses(orjson.loads(body))
        elif self.url.startswith(b"/_bench/stats"):
            self._write_json({"requests": self.upstream.requests})
        else:
            self._write_json({"error": {"message": "not found"}}, status=b"404 Not Found")

    # --- answers ----------------------------------------------------------------

    def _write_json(self, value: object, status: bytes = b"200 OK") -> None:
        payload = orjson.dumps(value)
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                % (status, len(payload), payload)
            )

    def _chat(self, request: dict[str, Any]) -> None:
        upstream = self.upstream
        upstream.requests += 1
        behaviour = upstream.behaviour
        answers = upstream.answers(str(request.get("model", "gpt-4o-mini")))
        if not request.get("stream"):
            if behaviour.latency > 0:
                self.pending = self.loop.call_later(behaviour.latency, self._write, answers.whole)
            else:
                self._write(answers.whole)
            return
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        tail = answers.tail_with_usage if usage else answers.tail
        self._start(answers.stream_head, _Stream(answers.chat_steps, tail))

    def _responses(self, request: dict[str, Any]) -> None:
        """A streamed Response (the bench streams only): each stream its own response id."""
        upstream = self.upstream
        upstream.requests += 1
        answers = upstream.answers(str(request.get("model", "gpt-4o-mini")))
        response_id = b"resp_%048x" % upstream.requests
        before, after, steps = answers.responses()
        before = before.replace(RESPONSE_ID, response_id)
        after = after.replace(RESPONSE_ID, response_id)
        # The events before the text go out with the first delta, as chat's first chunk does.
        if steps:
            steps = [_http_chunk(before) + steps[0], *steps[1:]]
        else:
            after = before + after
        self._start(answers.stream_head, _Stream(steps, _http_chunk(after) + b"0\r\n\r\n"))

    def _start(self, head: bytes, stream: _Stream) -> None:
        behaviour = self.upstream.behaviour
        self.stream = stream
        self._write(head)
        if behaviour.interval <= 0:
            stream.handle = self.loop.call_later(behaviour.ttft, self._burst)
        else:
            stream.handle = self.loop.call_later(behaviour.ttft, self._tick)

    def _write(self, data: bytes) -> None:
        self.pending = None
        if self.transport is not None:
            self.transport.write(data)

    def _next_chunk(self, stream: _Stream) -> bool:
        """Write the next chunk; False once the stream is finished."""
        if stream.next == len(stream.steps):
            self._write(stream.tail)
            self.stream = None
            return False
        self._write(stream.steps[stream.next])
        stream.next += 1
        return True

    def _tick(self) -> None:
        stream = self.stream
        if stream is None or self.transport is None:
            return
        if self._next_chunk(stream):
            stream.handle = self.loop.call_later(self.upstream.behaviour.interval, self._tick)

    def _burst(self) -> None:
        """As fast as the socket takes: write until the transport asks us to pause."""
        stream = self.stream
        for _ in range(256):
            if stream is None or self.transport is None or self.paused:
                return
            if not self._next_chunk(stream):
                return
        stream.handle = self.loop.call_soon(self._burst)


def raise_fd_limit() -> None:
    """Many thousand sockets need many thousand descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def loop_factory() -> Any:
    """uvloop's loop when it is installed (it is a runtime dependency), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop


async def serve(host: str, port: int, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    server = await loop.create_server(
        lambda: Connection(upstream), host, port, backlog=16_384, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Bounded: the process ends on its own even if whoever started it is gone.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=lifetime)
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this long")
    args = parser.parse_args(argv)
    raise_fd_limit()
    started = time.monotonic()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(args.host, args.port, args.lifetime))
    if os.environ.get("BENCH_VERBOSE"):
        print(f"upstream ran {time.monotonic() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
