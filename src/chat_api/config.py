"""Settings: the only place that reads the environment.

Every setting comes from an environment variable (or a `.env` file in the
working directory). Bad values stop startup with one line that names the
variable; `settings_error_line` builds that line from pydantic's error.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

DEFAULT_EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-3-large")
DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4-turbo",
    "gpt-4",
    "gpt-3.5-turbo",
    "o1-preview",
    "o1-mini",
)

ENV_PREFIX = "CHAT_API_"
OPENAI_V1 = "https://api.openai.com/v1"


class ModelOverride(BaseModel):
    """What an operator may say about one model in `CHAT_API_MODEL_CAPABILITIES`."""

    model_config = {"extra": "forbid"}

    system_role: bool | None = None
    streaming: bool | None = None
    sampling: bool | None = None
    token_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    output_ceiling: int | None = Field(default=None, ge=1)
    context_window: int | None = Field(default=None, ge=1)


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError unless a number from 0 to 65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


CommaList = Annotated[tuple[str, ...], NoDecode]
FieldRule = Literal["pass", "drop", "refuse"]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Everything chat-api can be told, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        # Errors name the field, not its first alias: `variable_name` turns it into the variable.
        loc_by_alias=False,
    )

    # --- upstream -----------------------------------------------------------
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_API_KEY_CYB_SEC", "OPENAI_API_KEY", "openai_api_key"),
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    upstream_client: Literal["aiohttp", "sdk"] = "aiohttp"
    upstream_timeout: float = Field(default=120.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    upstream_retries: int = Field(default=2, ge=0, le=10)
    upstream_max_connections: int = Field(default=10_000, ge=1)
    stream_deadline: float = Field(default=900.0, gt=0)
    # Background responses: how long to keep asking the upstream whether one is done.
    background_wait: float = Field(default=3600.0, gt=0)
    background_poll_interval: float = Field(default=2.0, gt=0)
    keepalive_interval: float = Field(default=15.0, gt=0)

    # --- models -------------------------------------------------------------
    models: CommaList = DEFAULT_MODELS
    default_model: str = "gpt-4o-mini"
    embedding_models: CommaList = DEFAULT_EMBEDDING_MODELS
    model_capabilities: dict[str, ModelOverride] = Field(default_factory=dict)
    prices: dict[str, tuple[Decimal, Decimal]] = Field(default_factory=dict)

    # --- demo ---------------------------------------------------------------
    demo: bool = False
    demo_delay: float = Field(default=0.03, ge=0)

    # --- HTTP ---------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=0, le=65535)
    # None: `*` with keys on, no other site with keys off (see `allowed_origins`).
    cors_origins: CommaList | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "plain"] = "plain"

    # --- input limits -------------------------------------------------------
    # 32 MiB: room for what OpenAI itself accepts in one request (images and PDFs
    # sent inline as base64 data URLs). Bodies are read as they arrive and
    # refused the moment they pass it, so a large limit costs nothing until used.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(default=30.0, gt=0)
    max_messages: int = Field(default=500, ge=1)
    max_message_chars: int = Field(default=200_000, ge=1)
    max_tokens_limit: int = Field(default=65_536, ge=1)
    max_choices: int = Field(default=8, ge=1)

    # --- keys, limits, storage -----------------------------------------------
    master_key: SecretStr | None = None
    database_url: str = "sqlite+aiosqlite:///./chat-api.db"
    database_pool_size: int = Field(default=10, ge=1, le=10_000)
    database_max_overflow: int = Field(default=20, ge=0, le=10_000)
    database_timeout: float = Field(default=3.0, gt=0, le=600)
    redis_url: str | None = None
    redis_prefix: str = "chatapi:"
    replicas: int = Field(default=1, ge=1)
    auth_failures_per_minute: int = Field(default=30, ge=1)
    max_in_flight: int = Field(default=32, ge=0)  # per client key that sets none; 0: no cap
    ledger_flush_interval: float = Field(default=0.5, gt=0)
    ledger_batch_size: int = Field(default=200, ge=1)
    # With Redis: how long a dead replica's calls hold their slots and leases before
    # another replica settles them, and how often each replica looks for such leases.
    lease_seconds: float = Field(default=30.0, gt=0)
    reaper_interval: float = Field(default=5.0, gt=0)
    migrate_on_start: bool = True
    shutdown_grace: float = Field(default=20.0, ge=0)
    prometheus_multiproc_dir: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"),
    )

    # --- who is calling, and what they may ask (issue 16) ---------------------
    # Proxies whose X-Forwarded-For is believed: addresses or networks (CIDR).
    trusted_proxies: CommaList = ()
    # Per request field: "pass" (the default), "drop" (removed before the call) or "refuse" (400).
    field_policy: dict[str, FieldRule] = Field(default_factory=dict)

    _split = field_validator(
        "models", "embedding_models", "cors_origins", "trusted_proxies", mode="before"
    )(_split_commas)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an address or a network like 10.0.0.0/8"
                ) from None
        return value

    @field_validator("field_policy")
    @classmethod
    def _policy_spares_the_request(cls, value: dict[str, FieldRule]) -> dict[str, FieldRule]:
        for name in ("model", "messages", "stream"):
            if value.get(name, "pass") != "pass":
                raise ValueError(f"the field '{name}' cannot be dropped or refused")
        return value

    @field_validator("openai_api_key", "master_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("openai_base_url")
    @classmethod
    def _base_url_is_a_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not _is_http_url(value.strip()):
            raise ValueError(f"must be an http:// or https:// URL with a host, like {OPENAI_V1}")
        return value.strip()

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one model")
        return value

    @model_validator(mode="after")
    def _default_is_allowed(self) -> Settings:
        if self.default_model not in self.models:
            raise ValueError(
                f"CHAT_API_DEFAULT_MODEL {self.default_model!r} is not in CHAT_API_MODELS"
            )
        if self.master_key is not None and len(self.master_key.get_secret_value()) < 16:
            raise ValueError("CHAT_API_MASTER_KEY must be at least 16 characters long")
        self._every_model_priced()
        return self

    def _every_model_priced(self) -> None:
        """No model is free by accident: each allowed one has a price, none is negative."""
        from chat_api.prices import DEFAULT_PRICES, list_price  # prices import nothing of ours

        for name, (price_in, price_out) in self.prices.items():
            if price_in < 0 or price_out < 0:
                raise ValueError(f"CHAT_API_PRICES: the price of {name} must not be negative")
        if self.demo:
            return  # the demo model costs nothing, whatever a request calls it
        prices = {**DEFAULT_PRICES, **self.prices}
        for name in (*self.models, *self.embedding_models):
            if list_price(name, prices) is None:
                raise ValueError(
                    f"CHAT_API_PRICES: no price for the model {name}. Every allowed model needs "
                    f"one, e.g. CHAT_API_PRICES='{{\"{name}\": [1.25, 10]}}' (USD per million "
                    "input and output tokens; [0, 0] makes it free on purpose)"
                )

    @property
    def has_upstream_key(self) -> bool:
        return self.openai_api_key is not None

    @property
    def keys_enabled(self) -> bool:
        return self.master_key is not None

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        """Origins browsers may call from: as set, else any with keys on and none with keys off.

        With keys off, a page on any website could otherwise spend the operator's key
        through a gateway on the visitor's own machine.
        """
        if self.cors_origins is not None:
            return self.cors_origins
        return ("*",) if self.keys_enabled else ()


_VARIABLE_FOR_FIELD = {
    "openai_api_key": "OPENAI_API_KEY_CYB_SEC",
    "openai_base_url": "OPENAI_BASE_URL",
    "prometheus_multiproc_dir": "PROMETHEUS_MULTIPROC_DIR",
}


_SECRET_FIELDS = {"openai_api_key", "master_key"}


def variable_name(field: str) -> str:
    """The environment variable a settings field is read from."""
    return _VARIABLE_FOR_FIELD.get(field, ENV_PREFIX + field.upper())


def settings_error_line(error: ValidationError | SettingsError) -> str:
    """One plain line naming the variable that stopped startup."""
    if isinstance(error, SettingsError):
        # pydantic-settings says: error parsing value for field "prices" from source ...
        match = re.search(r'field "(\w+)"', str(error))
        field = match.group(1) if match else "a setting"
        return f"{variable_name(field)}: must be valid JSON (see the README's settings table)"
    first = error.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    if not loc:
        return message
    value = first.get("input")
    secret = str(loc[0]) in _SECRET_FIELDS
    plain = not (secret or isinstance(value, dict) or value is None)
    shown = f" (got {str(value)[:60]!r})" if plain else ""
    return f"{variable_name(str(loc[0]))}: {message}{shown}"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """`CHAT_API_*` variables that no setting reads: almost always a typo.

    Both places settings come from are looked at, the environment and the
    `.env` file; a name found only in `.env` is given as `NAME in .env`.
    """
    env = os.environ if environ is None else environ
    known = {variable_name(name) for name in Settings.model_fields}
    # pydantic-settings reads names in any case, so compare them in upper case.
    in_env = {name.upper() for name in env}
    in_file = {name.upper() for name in DotEnvSettingsSource(Settings).env_vars} - in_env

    def unknown(names: set[str]) -> list[str]:
        return sorted(name for name in names if name.startswith(ENV_PREFIX) and name not in known)

    return [*unknown(in_env), *(f"{name} in .env" for name in unknown(in_file))]


def base_url_hint(url: str | None) -> str | None:
    """A warning for an `OPENAI_BASE_URL` that is valid but likely to answer 404."""
    if url is None:
        return None
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    calls = f"chat calls go to {url.rstrip('/')}/chat/completions"
    host = parts.hostname or ""
    if host == "openai.com" or host.endswith(".openai.com"):
        if not path.endswith("/v1"):
            return f"OPENAI_BASE_URL has no /v1 at the end: {calls}; OpenAI's API is at {OPENAI_V1}"
        return None
    if not path:
        return (
            f"OPENAI_BASE_URL has no path: {calls}; most OpenAI-compatible servers answer "
            "under /v1, like http://localhost:11434/v1"
        )
    return None
