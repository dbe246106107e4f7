"""Client keys: made random, shown once, kept only as a hash.

A key looks like `cak_` + 43 URL-safe characters (256 bits). Its SHA-256 is
stored; the first 12 characters are kept to let people tell keys apart.
Requests find keys through `KeyCache` (store/keycache.py), which reads
them from here once and learns of every change through `KeySetVersion`: a
revocation is seen by the very next request on every replica. Every method
gives up after `timeout` seconds with a 503 (None: no limit, for the CLI).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Executable

from chat_api.blank import NOT_BLANK, strip_blanks
from chat_api.calls import Caller
from chat_api.errors import ChangeNotAnnounced
from chat_api.store.database import answering, as_utc, utcnow
from chat_api.store.schema import client_keys

if TYPE_CHECKING:
    from chat_api.store.keycache import KeySetVersion

KEY_PREFIX = "cak_"
Period = Literal["daily", "monthly", "total"]


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class KeySpec(BaseModel):
    """What a new key may carry. Used by `POST /admin/keys` and `chat-api keys create`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, json_schema_extra={"pattern": NOT_BLANK})
    models: list[str] = Field(default_factory=list, description="Allowed models; empty = all.")
    rpm: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Requests per minute."
    )
    tpm: int | None = Field(default=None, ge=1, le=1_000_000_000, description="Tokens per minute.")
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Calls this key may have in progress at once; none: the server's default.",
    )
    budget_usd: Decimal | None = Field(
        default=None,
        ge=0,
        max_digits=18,
        decimal_places=6,
        # What is accepted, said in the schema: dollars with at most 6 decimals.
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 999_999_999_999},
                {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$"},
                {"type": "null"},
            ]
        },
    )
    budget_period: Period | None = Field(
        default=None, description="daily, monthly or total (the default when a budget is set)."
    )
    expires_at: datetime | None = Field(
        default=None, description="An ISO 8601 date and time (numbers are refused)."
    )
    # A ceiling, or `now + timedelta(days=1e308)` overflows (a 500, found by schemathesis).
    expires_in_days: float | None = Field(default=None, gt=0, le=36_500, strict=True)

    @field_validator("rpm", "tpm", "max_in_flight", mode="before")
    @classmethod
    def _limit_is_a_number(cls, value: Any) -> Any:
        """`true` or "60" is a mistake to name, not a limit of 1 or 60 (60.0 is a number)."""
        if isinstance(value, bool | str):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return value

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expiry_is_a_date(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("must be an ISO 8601 date and time, like 2026-12-31T00:00:00Z")
        return value

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        name = strip_blanks(value)
        if not name:
            raise ValueError("must not be blank")
        return name


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    max_in_flight: int | None
    budget_usd: Decimal | None
    budget_period: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: RowMapping) -> KeyRecord:
        models = tuple(m for m in (row["models"] or "").split(",") if m)
        budget = row["budget_usd"]
        return cls(
            id=row["id"],
            name=row["name"],
            prefix=row["prefix"],
            models=models,
            rpm=row["rpm"],
            tpm=row["tpm"],
            max_in_flight=row["max_in_flight"],
            budget_usd=Decimal(str(budget)) if budget is not None else None,
            budget_period=row["budget_period"],
            expires_at=as_utc(row["expires_at"]),
            revoked_at=as_utc(row["revoked_at"]),
            created_at=as_utc(row["created_at"]) or utcnow(),
        )

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def caller(self, key_version: bytes | None = None) -> Caller:
        return Caller(
            key_id=self.id,
            name=self.name,
            models=self.models,
            rpm=self.rpm,
            tpm=self.tpm,
            max_in_flight=self.max_in_flight,
            budget_usd=self.budget_usd,
            budget_period=self.budget_period,
            key_version=key_version,
        )

    def public(self) -> dict[str, Any]:
        """Everything about the key except anything secret."""
        now = utcnow()
        status = "revoked" if self.revoked_at else "active" if self.usable(now) else "expired"
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "status": status,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_in_flight": self.max_in_flight,
            "budget_usd": float(self.budget_usd) if self.budget_usd is not None else None,
            "budget_period": self.budget_period,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "created_at": self.created_at.isoformat(),
        }


class KeyStore:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        timeout: float | None = None,
        version: KeySetVersion | None = None,
    ) -> None:
        self._engine = engine
        self._timeout = timeout
        self._version = version

    async def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A new key; the secret is returned here and never again.

        Nothing to announce: caches hold only keys that existed when read.
        """
        secret = new_secret()
        now = utcnow()
        expires = spec.expires_at
        if spec.expires_in_days is not None:
            expires = now + timedelta(days=spec.expires_in_days)
        period = spec.budget_period or ("total" if spec.budget_usd is not None else None)
        values = {
            "id": "key_" + secrets.token_hex(8),
            "name": spec.name,
            "prefix": secret[:12],
            "key_hash": hash_key(secret),
            "models": ",".join(spec.models),
            "rpm": spec.rpm,
            "tpm": spec.tpm,
            "max_in_flight": spec.max_in_flight,
            "budget_usd": spec.budget_usd,
            "budget_period": period,
            "expires_at": expires,
            "revoked_at": None,
            "created_at": now,
        }
        await self._write(client_keys.insert().values(**values), "Keys cannot be created")
        record = await self.get(str(values["id"]))
        assert record is not None
        return record, secret

    async def find(self, secret: str) -> KeyRecord | None:
        """The key whose secret this is, if any (usable or not)."""
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = hash_key(secret)
        query = select(client_keys).where(client_keys.c.key_hash == digest)
        rows = await self._read(query, "Keys cannot be checked")
        if not rows or not hmac.compare_digest(rows[0]["key_hash"], digest):
            return None
        return KeyRecord.from_row(rows[0])

    async def get(self, key_id: str) -> KeyRecord | None:
        rows = await self._read(
            select(client_keys).where(client_keys.c.id == key_id), "Keys cannot be read"
        )
        return KeyRecord.from_row(rows[0]) if rows else None

    async def all(self) -> list[KeyRecord]:
        query = select(client_keys).order_by(client_keys.c.created_at)
        return [KeyRecord.from_row(row) for row in await self._read(query, "Keys cannot be read")]

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke a key and tell every process (again, if it was revoked already).

        Raises `ChangeNotAnnounced` when the revocation is committed but Redis
        could not carry the news: other replicas then refuse the key within
        a minute instead of at once, and revoking again tells them.
        """
        await self._write(
            update(client_keys)
            .where(client_keys.c.id == key_id, client_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow()),
            "Keys cannot be changed",
        )
        record = await self.get(key_id)
        if record is not None and self._version is not None:
            try:
                await self._version.changed()
            except (RedisError, OSError):
                raise ChangeNotAnnounced(record.id) from None
        return record

    async def _read(self, query: Executable, failure: str) -> Sequence[RowMapping]:
        async def run() -> Sequence[RowMapping]:
            async with self._engine.connect() as connection:
                return (await connection.execute(query)).mappings().all()

        return await answering(self._timeout, failure, run())

    async def _write(self, statement: Executable, failure: str) -> None:
        async def run() -> None:
            async with self._engine.begin() as connection:
                await connection.execute(statement)

        await answering(self._timeout, failure, run())
