"""The one engine every operation runs through.

A call goes: the operation's `prepare` (check, pick the model, work out the
worst case) → the meter's `admit` (limits, calls in flight, the worst-case
reservation) → the provider → settlement (the ledger row at what the
upstream billed, the reservation swapped for the real cost). Routes are
thin adapters over `complete` and `stream`; none can skip a step.

Once admitted, a call always settles, exactly once, whatever happens:

- a whole answer is read by its own task, so a client that leaves does not
  stop it (OpenAI goes on writing and bills the whole answer): the task
  reads it to the end, bounded by the upstream timeout, and records its
  exact usage;
- a stream is a `CallStream`, which owns its upstream response and its
  settlement, as openai-python's `Stream` owns its close: closed by its
  iterator's end, by `aclose()`, or when opening it fails, even if nobody
  ever iterated it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol
from urllib.parse import quote

from chat_api.calls import CallContext, CallResult, Chunk, Prepared, StreamStats
from chat_api.catalog import Catalog
from chat_api.config import Settings
from chat_api.errors import ChatAPIError, NotConfigured, UpstreamError, UpstreamTimeout
from chat_api.limits.admission import Admission, Meter
from chat_api.operations.base import Operation, parse_event
from chat_api.operations.chat import ChatCompletion, as_chunks
from chat_api.operations.embeddings import Embedding
from chat_api.operations.responses import Compaction, Response, is_final
from chat_api.providers.base import Completion, Provider, UpstreamStream
from chat_api.tokens import CHARS_PER_TOKEN


class StreamedAnswer(Protocol):
    """What `Engine.stream` hands back: events to relay, and a close that settles."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class Engine:
    """Meters and forwards every operation's calls to the provider."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        provider: Provider | None,
        meter: Meter,
        streams_changed: Callable[[int], None] = lambda delta: None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.provider = provider
        self.meter = meter
        self.chat = ChatCompletion(settings, catalog)
        # /chat and /chat/stream write the upstream body themselves: no client field to police.
        self.simple_chat = ChatCompletion(settings, catalog, field_policy={})
        self.responses = Response(settings, catalog)
        self.compaction = Compaction(settings, catalog)
        self.embeddings = Embedding(settings, catalog)
        self.open_streams = 0
        self.streams_changed = streams_changed
        self._whole_answers: set[asyncio.Task[Completion]] = set()
        self._background: set[asyncio.Task[Any]] = set()  # background answers being watched
        self._stopping = False  # set by `drain`: no new watch, a background answer bills now
        self._settle_due = 0  # whole answers read, their settlement due in a turn or three

    def _provider(self) -> Provider:
        if self.provider is None:
            raise NotConfigured()
        return self.provider

    async def complete(self, prepared: Prepared, ctx: CallContext) -> Completion:
        """One whole answer. Every call that reached the upstream is settled."""
        provider = self._provider()
        admission = await self.meter.admit(ctx, prepared)
        result = ctx.result = CallResult.start(ctx, prepared)
        return await _awaited(self._start_whole(provider, prepared, result, admission), result)

    def _start_whole(
        self, provider: Provider, prepared: Prepared, result: CallResult, admission: Admission
    ) -> asyncio.Task[Completion]:
        """The whole answer, read (and settled) by its own task: a client leaving cannot stop it."""
        task = asyncio.get_running_loop().create_task(
            self._whole(provider, prepared, result, admission)
        )
        self._whole_answers.add(task)
        task.add_done_callback(self._whole_answers.discard)
        return task

    async def _whole(
        self, provider: Provider, prepared: Prepared, result: CallResult, admission: Admission
    ) -> Completion:
        operation = prepared.operation
        started = time.monotonic()
        settle_now = True
        try:
            completion = await provider.complete(
                operation.upstream_path, prepared.body, result.request_id
            )
        except BaseException as exc:
            result.fail(exc)
            if _may_still_be_written(exc, result):
                result.use_worst(prepared.output_bound)
            else:
                result.use_usage(None)
            raise
        else:
            result.outcome = "client_closed" if result.client_left else "ok"
            result.upstream_request_id = completion.upstream_request_id
            pending = operation.pending(completion.data)
            if pending is not None:
                # Background mode: the reservation is held until the answer is final.
                settle_now = False
                self.watch(provider, operation, prepared.output_bound, result, admission, pending)
                return completion
            # No usage in the answer (some compatible servers): its size, a token per 4 bytes.
            written = -(-len(completion.raw) // CHARS_PER_TOKEN)
            result.use_usage(operation.usage(completion.data), generated=written)
            return completion
        finally:
            result.latency = time.monotonic() - started
            result.first_token = result.latency
            if settle_now:
                self._settle_after_answer(admission, result)

    def _settle_after_answer(self, admission: Admission, result: CallResult) -> None:
        """Settle once the answer is written to the client, not in its way.

        The settlement (the ledger row, the corrections for Redis) is
        exactly as it was, three turns of the loop later: the shield that
        keeps this task from the client's cancellation passes the answer on
        in one turn, the request's task wakes in the next and writes it. At
        shutdown it settles at once, and `drain` waits for any still due.
        """
        if self._stopping:
            admission.settle(result)
            return
        self._settle_due += 1

        def settle() -> None:
            self._settle_due -= 1
            admission.settle(result)

        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, loop.call_soon, settle)

    def watch(
        self,
        provider: Provider,
        operation: Operation,
        output_bound: int,
        result: CallResult,
        admission: Admission,
        response_id: str,
    ) -> None:
        """Settle a background answer once the upstream says how it ended (its own task).

        If it is not final within `CHAT_API_BACKGROUND_WAIT`, or the server stops
        first (nobody is left to ask), it is billed at its worst case. The task's
        done callback settles, so a task cancelled before it ever ran settles too.
        """
        if self._stopping:
            result.use_worst(output_bound)
            admission.settle(result)
            return

        def settle(done: asyncio.Task[tuple[int, int] | None]) -> None:
            self._background.discard(done)
            usage = None if done.cancelled() or done.exception() else done.result()
            if usage is None:
                result.use_worst(output_bound)
            else:
                result.use_usage(usage)
            admission.settle(result)

        task = asyncio.get_running_loop().create_task(
            self._final_usage(provider, operation, result.request_id, response_id)
        )
        self._background.add(task)
        task.add_done_callback(settle)

    async def _final_usage(
        self, provider: Provider, operation: Operation, request_id: str, response_id: str
    ) -> tuple[int, int] | None:
        """Ask the upstream how a background answer ended (bounded): its usage, once final."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.background_wait
        interval = self.settings.background_poll_interval
        path = "/responses/" + quote(response_id, safe="")  # the upstream's id, one segment
        while loop.time() < deadline:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 30.0)
            try:
                answer = await provider.forward("GET", path, None, request_id)
            except ChatAPIError:
                continue  # away for a moment: ask again
            if is_final(answer.data):
                return operation.usage(answer.data)
        return None

    async def stream(self, prepared: Prepared, ctx: CallContext) -> StreamedAnswer:
        """Open a streamed answer.

        Errors before the upstream answered (retries done) are raised here,
        so the caller can still answer with a status code; the call is
        settled by then. The returned stream raises `ChatAPIError` for
        failures after that, and settles when it ends or is closed.
        """
        provider = self._provider()
        admission = await self.meter.admit(ctx, prepared)
        result = ctx.result = CallResult.start(ctx, prepared)
        if not prepared.model.streaming:
            # Read by its own task; the stream starts now, so pings flow while it thinks.
            return _Replay(
                prepared, result, self._start_whole(provider, prepared, result, admission)
            )
        call = CallStream(self, prepared, result, admission)
        try:
            await call.open(provider)
        except BaseException as exc:
            result.fail(exc)
            await call.aclose()
            raise
        if call.upstream_request_id:
            ctx.headers["X-Upstream-Request-ID"] = call.upstream_request_id
        return call

    async def drain(self, grace: float) -> None:
        """Let whole answers still being read (clients gone) finish and settle, at shutdown."""
        self._stopping = True
        if self._whole_answers:
            await asyncio.wait(set(self._whole_answers), timeout=grace)
        for task in [*self._whole_answers, *self._background]:
            task.cancel()  # settles with an estimate: its finally runs
        if self._whole_answers or self._background:
            await asyncio.wait({*self._whole_answers, *self._background}, timeout=1.0)
        for _ in range(10):  # settlements due in the next turns of the loop (three at most)
            if not self._settle_due:
                break
            await asyncio.sleep(0)


class CallStream:
    """A streamed answer that owns its upstream response and its settlement."""

    def __init__(
        self, engine: Engine, prepared: Prepared, result: CallResult, admission: Admission
    ) -> None:
        self._engine = engine
        self._operation = prepared.operation
        self._output_bound = prepared.output_bound
        self._background = prepared.body.get("background") is True
        self._provider: Provider | None = None
        self._wants_usage = prepared.client_wants_usage
        self._result = result
        self._admission: Admission | None = admission
        self._body: dict[str, Any] | None = prepared.body
        self._upstream: UpstreamStream | None = None
        self._ended = False  # the relay ran to its end or raised: the outcome is set
        self._stats = StreamStats()
        self._started = time.monotonic()
        self.upstream_request_id: str | None = None
        engine.open_streams += 1
        engine.streams_changed(1)

    async def open(self, provider: Provider) -> None:
        body, self._body = self._body, None  # not held while it streams: the whole conversation
        assert body is not None
        self._provider = provider
        self._upstream = await provider.open_stream(
            self._operation.upstream_path, body, self._result.request_id
        )
        self.upstream_request_id = self._upstream.upstream_request_id

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[Chunk]:
        upstream = self._upstream
        assert upstream is not None
        stats = self._stats
        try:
            async for raw in upstream:
                chunk = parse_event(raw)
                self._operation.observe(chunk, stats, self._wants_usage)
                if stats.first_token_at is None:
                    stats.first_token_at = time.monotonic()
                if chunk.relay:
                    yield chunk
                del raw, chunk  # not held while the next event is awaited: thousands wait at once
            if self._operation.ends_with_done and not upstream.saw_done and not stats.finished:
                raise UpstreamError("The answer was cut off: the connection to OpenAI ended early.")
            if not self._operation.ends_with_done and not stats.finished:
                raise UpstreamError("The answer was cut off: the connection to OpenAI ended early.")
            self._result.outcome = "ok"
            self._ended = True
        except BaseException as exc:
            self._result.fail(exc)
            self._ended = True
            raise
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the upstream at once and settle the call; safe to call twice."""
        admission, self._admission = self._admission, None
        if admission is None:
            return
        engine, result, stats = self._engine, self._result, self._stats
        engine.open_streams -= 1
        engine.streams_changed(-1)
        try:
            if self._upstream is not None:
                await self._upstream.aclose()
                result.upstream_request_id = self._upstream.upstream_request_id
        finally:
            result.latency = time.monotonic() - self._started
            if stats.first_token_at is not None:
                result.first_token = stats.first_token_at - self._started
            if not self._ended and self._upstream is not None:
                result.outcome = "client_closed"  # closed from outside before its end
            if stats.pending is not None and not stats.finished and self._provider is not None:
                # A background answer goes on upstream without its stream (and is billed
                # in full): settled once the upstream says it is final, as a whole one is.
                engine.watch(
                    self._provider,
                    self._operation,
                    self._output_bound,
                    result,
                    admission,
                    stats.pending,
                )
            elif self._background and not stats.finished and self._upstream is not None:
                result.use_worst(self._output_bound)  # cut before it said its id: unknowable
                admission.settle(result)
            else:
                generated = max(stats.pieces, -(-stats.generated_bytes // CHARS_PER_TOKEN))
                result.use_usage(self._operation.stream_usage(stats), generated=generated)
                admission.settle(result)


def _may_still_be_written(exc: BaseException, result: CallResult) -> bool:
    """Whether a whole answer that ended with `exc` may still be written, and billed, by OpenAI.

    It was sent and then given up on: timed out, or stopped with the server.
    OpenAI writes a whole answer to its end whoever stopped waiting for it.
    """
    if isinstance(exc, UpstreamTimeout):
        return exc.sent
    return result.outcome == "server_stopped"


async def _awaited(task: asyncio.Task[Completion], result: CallResult) -> Completion:
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        result.client_left = True  # the task reads the answer to its end and settles it
        raise


class _Replay:
    """A whole answer, read by its own task, relayed as the stream events it would have been."""

    def __init__(
        self, prepared: Prepared, result: CallResult, task: asyncio.Task[Completion]
    ) -> None:
        self._prepared = prepared
        self._result = result
        self._task = task

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        completion = await _awaited(self._task, self._result)
        stats = StreamStats()
        operation = self._prepared.operation
        for raw in as_chunks(completion):
            chunk = parse_event(raw)
            operation.observe(chunk, stats, self._prepared.client_wants_usage)
            if chunk.relay:
                yield chunk

    async def aclose(self) -> None:
        if not self._task.done():
            self._result.client_left = True  # it goes on, and settles when the answer is in
