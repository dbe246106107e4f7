"""The nouns of a call: who asked, what was asked, what it may cost, what it cost.

Plain data, no behaviour beyond arithmetic: the engine, the limits and the
ledger all speak in these words, and none of them imports another to get
them. A call goes `Prepared` (checked, priced, its worst case known) →
admitted → `CallResult` (the ledger row, filled in as the call goes).
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from chat_api import clock
from chat_api.catalog import ModelInfo
from chat_api.errors import Forbidden, outcome_of

if TYPE_CHECKING:
    from chat_api.operations.base import Operation


@dataclass(frozen=True, slots=True)
class Caller:
    """The key a request came with. `key_id` is None for the master key."""

    key_id: str | None
    name: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: Decimal | None = None
    budget_period: str | None = None
    max_in_flight: int | None = None
    # Set when the key came from this process's cache without asking Redis whether the key
    # set changed: the key-set version it was cached under, which admission checks in its
    # own Redis round trip (limits/admission.py). None: already checked.
    key_version: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def is_master(self) -> bool:
        return self.key_id is None

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise Forbidden(f"This key may not use the model '{model}'.", param="model")


@dataclass(slots=True)
class CallContext:
    """Who asked, through which endpoint, under which request id."""

    request_id: str
    endpoint: str
    caller: Caller | None = None
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers for the answer
    result: CallResult | None = None  # set once the call is let through, for the log line


@dataclass(slots=True)
class Prepared:
    """A checked request, ready for the upstream, with its worst case worked out.

    `prompt_bound` is the most the upstream can bill for reading it and
    `output_bound` the most it may write (every choice together): what
    budgets and token limits reserve before the call starts. A response
    that continues stored context has that context's images added to its
    `prompt_bound` by its route, once it has looked them up.
    """

    operation: Operation
    model: ModelInfo
    body: dict[str, Any]
    stream: bool
    prompt_bound: int
    output_bound: int
    client_wants_usage: bool = False
    media: int = 0  # images and PDF pages of its own input, read again if it is continued

    @property
    def worst_tokens(self) -> int:
        return self.prompt_bound + self.output_bound

    @property
    def worst_cost(self) -> Decimal:
        return self.model.cost(self.prompt_bound, self.output_bound)


@dataclass(slots=True)
class Chunk:
    """One streamed event: the bytes as received, and their parse."""

    raw: bytes
    data: dict[str, Any]
    relay: bool = True  # False: the gateway's own (usage the client did not ask for)


@dataclass(slots=True)
class StreamStats:
    """What a stream relayed so far: its usage once known, else what to estimate from."""

    usage: dict[str, Any] | None = None
    pieces: int = 0  # text pieces generated: OpenAI streams about a token each
    generated_bytes: int = 0
    finished: bool = False  # the upstream said the answer is complete
    first_token_at: float | None = None
    pending: str | None = None  # a background answer's id: it goes on upstream if cut off


# A stream cut short: tokens the upstream may have written after the last one
# that reached the gateway, before it saw the connection close.
UNSEEN_TOKENS = 16


_call_ids: tuple[str, Iterator[int]] = ("", iter(()))


def _new_process() -> None:
    global _call_ids
    _call_ids = (secrets.token_hex(10), itertools.count())


_new_process()
os.register_at_fork(after_in_child=_new_process)  # a forked worker must not repeat its parent's


def new_call_id() -> str:
    """A call's id, unique across replicas and restarts (the ledger keeps one row per id).

    A random 80-bit prefix per process, then a counter: no system call per
    call, and two processes never share a prefix in practice.
    """
    prefix, count = _call_ids
    return f"call_{prefix}{next(count):x}"


@dataclass(slots=True)
class CallResult:
    """Everything the ledger keeps about one call that reached the upstream."""

    at: float
    request_id: str
    key_id: str | None
    endpoint: str
    priced: ModelInfo  # the model, with the prices the call is billed at
    streamed: bool
    prompt_bound: int
    call_id: str = field(default_factory=new_call_id)
    outcome: str = "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    latency: float = 0.0
    first_token: float | None = None
    upstream_request_id: str | None = None
    client_left: bool = False  # the client went away; the upstream may have gone on

    @classmethod
    def start(cls, ctx: CallContext, prepared: Prepared) -> CallResult:
        return cls(
            at=clock.now(),
            request_id=ctx.request_id,
            key_id=ctx.caller.key_id if ctx.caller else None,
            endpoint=ctx.endpoint,
            priced=prepared.model,
            streamed=prepared.stream,
            prompt_bound=prepared.prompt_bound,
        )

    def fail(self, exc: BaseException) -> None:
        self.outcome = outcome_of(exc)

    def use_usage(self, usage: tuple[int, int] | None, *, generated: int = 0) -> None:
        """Take the upstream's exact usage; without it, bill what it may have billed.

        A call the upstream started is billed for its whole prompt (at its
        bound) and what was generated (plus what may not have reached us),
        unless it failed before anything was read: then the upstream refused
        it and billed nothing.
        """
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage
            self.estimated = False
            return
        if self.outcome in ("client_closed", "timeout", "ok", "server_stopped") or generated:
            self.prompt_tokens = self.prompt_bound
            self.completion_tokens = generated + UNSEEN_TOKENS
            self.estimated = True

    def use_worst(self, output_bound: int) -> None:
        """Bill the call's worst case: sent, and no answer seen, OpenAI may still write it all."""
        self.prompt_tokens, self.completion_tokens = self.prompt_bound, output_bound
        self.estimated = True

    @property
    def model(self) -> str:
        return self.priced.name

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> Decimal:
        return self.priced.cost(self.prompt_tokens, self.completion_tokens)
