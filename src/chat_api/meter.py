"""Metering: who may call, how much they may spend, and what each call cost.

`Meter.admit` runs before the upstream is called: it checks the caller's
request and token rates and reserves the worst-case cost against its budget.
`Admission.settle` runs after, whatever happened: it writes the ledger row
(queued, never on the response path) and replaces the reservation with the
real cost. The implementation is `chat_api.limits.policy.KeyMeter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from chat_api.errors import Forbidden, outcome_of

if TYPE_CHECKING:
    from chat_api.engine import CallContext, Prepared


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

    @property
    def is_master(self) -> bool:
        return self.key_id is None

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise Forbidden(f"This key may not use the model '{model}'.", param="model")


@dataclass(slots=True)
class CallResult:
    """Everything the ledger keeps about one call that reached the upstream."""

    at: float
    request_id: str
    key_id: str | None
    endpoint: str
    model: str
    streamed: bool
    prompt_estimate: int
    outcome: str = "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cost: Decimal = Decimal(0)
    latency: float = 0.0
    first_token: float | None = None
    upstream_request_id: str | None = None

    @classmethod
    def start(cls, ctx: CallContext, prepared: Prepared, *, streamed: bool) -> CallResult:
        return cls(
            at=time.time(),
            request_id=ctx.request_id,
            key_id=ctx.caller.key_id if ctx.caller else None,
            endpoint=ctx.endpoint,
            model=prepared.model.name,
            streamed=streamed,
            prompt_estimate=prepared.prompt_estimate,
        )

    def fail(self, exc: BaseException) -> None:
        self.outcome = outcome_of(exc)

    def use_usage(self, usage: Any, *, estimate_completion: int) -> None:
        """Take the upstream's exact usage, or estimate when it never came."""
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.prompt_tokens, self.completion_tokens = prompt, completion
                self.estimated = False
                return
        if self.outcome in ("client_closed", "timeout", "ok") or estimate_completion:
            self.prompt_tokens = self.prompt_estimate
            self.completion_tokens = estimate_completion
            self.estimated = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def reset_duration(seconds: float) -> str:
    """A wait as OpenAI writes it in `x-ratelimit-reset-*`: "120ms", "8.64s", "6m0s", "1h2m3s"."""
    milliseconds = max(0, round(seconds * 1000))
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds / 1000, 3600)
    minutes, rest = divmod(rest, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


class Admission(Protocol):
    """A call let through; `settle` must be called exactly once when it ends."""

    def settle(self, result: CallResult) -> None: ...


class Meter(Protocol):
    async def admit(self, ctx: CallContext, prepared: Prepared) -> Admission: ...
